//! What this party offers to tasks and what of it is free, as it reports in Register and
//! every Heartbeat (client-selector's `selection: resource` draws parties by it).
//!
//! CPU, memory and GPUs are counted by allocation: the party offers a budget (`--cpus`,
//! `--memory`; by default the machine's) split evenly over its `--max-tasks` slots, and each
//! running task holds one share. Memory is also at most what the kernel has available now
//! (`MemAvailable`), so a machine short of memory reports less. Measured CPU load is not
//! used: it swings with every training step and with whatever else the machine runs, and
//! would rank parties by noise.

use cohort_proto::v1 as pb;

/// What the party offers to tasks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// CPUs (thousandths), `--cpus` or the machine's.
    pub cpu_millis: u64,
    /// `--memory`, or the machine's total.
    pub memory_bytes: u64,
    /// GPUs a task gets (executor Pods' `gpus`; for local executors, the machine's).
    pub gpus: u32,
    pub max_tasks: u32,
}

impl Budget {
    /// From the flags and the machine: `cpus` (None: every CPU), `memory` (None: all of it).
    pub fn new(cpus: Option<f64>, memory: Option<u64>, gpus: u32, max_tasks: u32) -> Budget {
        let machine_cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let cpu_millis = match cpus {
            Some(c) => (c * 1000.0).round() as u64,
            None => machine_cpus * 1000,
        };
        let total = meminfo("MemTotal:").unwrap_or(0);
        let memory_bytes = match memory {
            Some(m) if total > 0 => m.min(total),
            Some(m) => m,
            None => total,
        };
        Budget {
            cpu_millis,
            memory_bytes,
            gpus,
            max_tasks,
        }
    }

    /// The totals as registered (CPUs rounded up, so the free share never exceeds them).
    pub fn resources(&self, running: u32) -> pb::Resources {
        pb::Resources {
            cpus: u32::try_from(self.cpu_millis.div_ceil(1000)).unwrap_or(u32::MAX),
            memory_bytes: self.memory_bytes,
            gpus: self.gpus,
            max_tasks: self.max_tasks,
            free: Some(self.free(running, meminfo("MemAvailable:"))),
            gpu_devices: Vec::new(),
        }
    }

    /// What is free with `running` tasks, memory at most `available` (None: unknown).
    pub fn free(&self, running: u32, available: Option<u64>) -> pb::FreeResources {
        let slots = u64::from(self.max_tasks.max(1));
        let idle = u64::from(self.max_tasks.saturating_sub(running));
        let share = |total: u64| -> u64 {
            u64::try_from(u128::from(total) * u128::from(idle) / u128::from(slots))
                .unwrap_or(u64::MAX)
        };
        let memory = share(self.memory_bytes);
        pb::FreeResources {
            cpu_millis: u32::try_from(share(self.cpu_millis)).unwrap_or(u32::MAX),
            memory_bytes: available.map_or(memory, |a| memory.min(a)),
            gpus: if idle > 0 { self.gpus } else { 0 },
        }
    }

    /// Why an offer must be refused whatever else holds: nothing is offered.
    pub fn refusal(&self) -> Option<String> {
        (self.cpu_millis == 0).then(|| "no capacity: this party offers no CPUs (--cpus 0)".into())
    }
}

/// A `/proc/meminfo` figure in bytes (Linux), None where there is none.
fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb.saturating_mul(1024))
}

/// `--cpus`: a number of CPUs, 0 to 65536, fractions allowed.
pub fn parse_cpus(text: &str) -> Result<f64, String> {
    let c: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of CPUs"))?;
    if !c.is_finite() || !(0.0..=65_536.0).contains(&c) {
        return Err(format!("{text:?} is not between 0 and 65536"));
    }
    Ok(c)
}

/// `--memory`: bytes, or a number with KiB, MiB, GiB or TiB (also K, M, G, T: powers of
/// 1024).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a whole number, e.g. 512MiB or 4GiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn budget(cpu_millis: u64, memory_bytes: u64, gpus: u32, max_tasks: u32) -> Budget {
        Budget {
            cpu_millis,
            memory_bytes,
            gpus,
            max_tasks,
        }
    }

    #[test]
    fn each_running_task_holds_an_equal_share() {
        let b = budget(4000, 8 << 30, 1, 2);
        let idle = b.free(0, None);
        assert_eq!(
            (idle.cpu_millis, idle.memory_bytes, idle.gpus),
            (4000, 8 << 30, 1)
        );
        let half = b.free(1, None);
        assert_eq!(
            (half.cpu_millis, half.memory_bytes, half.gpus),
            (2000, 4 << 30, 1)
        );
        let full = b.free(2, None);
        assert_eq!((full.cpu_millis, full.memory_bytes, full.gpus), (0, 0, 0));
        // More running than slots (a task finishing late) is still none free.
        assert_eq!(b.free(5, None).cpu_millis, 0);
        // Memory is at most what the kernel has available.
        assert_eq!(b.free(0, Some(1 << 30)).memory_bytes, 1 << 30);
        assert_eq!(b.free(1, Some(16 << 30)).memory_bytes, 4 << 30);
        assert_eq!(
            budget(0, 1, 0, 1).refusal().unwrap(),
            "no capacity: this party offers no CPUs (--cpus 0)"
        );
        assert_eq!(b.refusal(), None);
    }

    #[test]
    fn totals_round_cpus_up() {
        let r = budget(1500, 1 << 30, 0, 2).resources(0);
        assert_eq!((r.cpus, r.memory_bytes, r.max_tasks), (2, 1 << 30, 2));
        let free = r.free.unwrap();
        assert_eq!(free.cpu_millis, 1500);
        assert!(free.memory_bytes <= 1 << 30);
    }

    #[test]
    fn flags_parse_and_refuse_what_they_must() {
        assert_eq!(parse_cpus("4").unwrap(), 4.0);
        assert_eq!(parse_cpus("0.5").unwrap(), 0.5);
        assert_eq!(parse_cpus("0").unwrap(), 0.0);
        for bad in ["-1", "NaN", "inf", "1e9", "four", ""] {
            assert!(parse_cpus(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert_eq!(parse_memory("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_memory("2 G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("1TiB").unwrap(), 1 << 40);
        for bad in ["", "GiB", "1.5GiB", "4GB", "-1", "99999999999TiB"] {
            assert!(parse_memory(bad).is_err(), "{bad:?}");
        }
    }
}
