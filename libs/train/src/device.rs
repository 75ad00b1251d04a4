//! Which candle device a task trains on (`training.device`). `cuda` is only possible in a
//! build with the `cuda` cargo feature; such a build still trains on the CPU under `auto`
//! when no GPU opens.

use candle_core::Device;
use cohort_core::spec::TrainingDevice;

use crate::TrainError;

/// Whether this build has candle's CUDA backend (the `cuda` cargo feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The device `training.device` asks for: `cpu` → CPU; `cuda` → GPU 0, or an error naming
/// `training.device` when this build has no CUDA or no GPU opens; `auto` → GPU 0 when
/// built with CUDA and one opens, else CPU.
pub fn select_device(wanted: TrainingDevice) -> Result<Device, TrainError> {
    match wanted {
        TrainingDevice::Cpu => Ok(Device::Cpu),
        TrainingDevice::Auto => Ok(open_cuda().unwrap_or(Device::Cpu)),
        TrainingDevice::Cuda if !CUDA_BUILT => Err(TrainError::invalid(
            "training.device",
            "\"cuda\" asked for, but this executor was built without CUDA \
             (cargo feature `cuda`); it will not train on the CPU instead",
        )),
        TrainingDevice::Cuda => open_cuda().ok_or_else(|| {
            TrainError::invalid(
                "training.device",
                "\"cuda\" asked for, but no CUDA device could be opened here",
            )
        }),
    }
}

/// A short name of the device, for logs and benchmarks: "cpu" or "cuda:0".
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Option<Device> {
    Device::new_cuda(0).ok()
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Option<Device> {
    None
}
