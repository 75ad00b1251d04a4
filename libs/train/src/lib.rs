//! cohort-train: local datasets and on-device training with candle (DESIGN §5).
//!
//! Loads a party's dataset from local files (CSV, NPY, IDX), partitions datasets for
//! simulations and demos (IID, Dirichlet label skew), and builds, trains and evaluates the
//! built-in models (logreg, mlp, cnn) on the CPU or, with the `cuda` feature, a GPU
//! (`device.rs`, chosen by `training.device`), with the local terms of FedProx and
//! SCAFFOLD (`scaffold.rs`: the control variates' correction and update). Weights cross
//! crate boundaries as [`NamedTensor`]s.
//!
//! This crate is pure compute plus reading local data files: it must not depend on gRPC,
//! networking or storage crates, so that it can run inside any executor and in tests.

mod data;
mod device;
mod error;
mod model;
mod partition;
pub mod party_datasets;
mod scaffold;

pub use data::{DataFormat, Dataset, load_dataset, write_csv};
pub use device::{CUDA_BUILT, device_name, select_device};
pub use error::TrainError;
pub use model::{
    Evaluation, LocalObjective, TrainOutcome, check_weights, evaluate, init_model, model_classes,
    param_shapes, train, train_with,
};
pub use partition::{partition_dirichlet, partition_iid, split_train_test};
pub use scaffold::{ControlUpdate, ControlVariates, zero_control};

/// One named f32 tensor, row-major: how weights travel between crates. The type lives in
/// cohort-core so that aggregation and the wire format share it without depending on candle.
pub use cohort_core::tensor::NamedTensor;
