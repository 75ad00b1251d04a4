//! Deliberately corrupted updates, for checking robust strategies against a party that lies:
//! `sign-flip` (−Δ), `scale=K` (K·Δ) and `noise=S` (Gaussian noise of standard deviation S
//! added to every value); and `stall`, a party that accepts training tasks and never delivers
//! them (for checking reliability selection). A party runs in this mode only when its
//! operator starts its task-manager with `--adversary`; it says so loudly.

use cohort_core::NamedTensor;

/// How a party corrupts its own update before sending it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Corruption {
    SignFlip,
    Scale(f32),
    Noise(f32),
    /// No update at all: the executor holds every training task until it is stopped.
    Stall,
}

impl Corruption {
    /// `sign-flip`, `scale=K` (K finite, |K| ≤ 1e6), `noise=S` (S finite, 0 < S ≤ 1e6) or
    /// `stall`.
    pub fn parse(text: &str) -> Result<Corruption, String> {
        let number = |v: &str, what: &str| -> Result<f32, String> {
            let x: f32 = v
                .trim()
                .parse()
                .map_err(|_| format!("{what} must be a number, got {v:?}"))?;
            if !x.is_finite() || x.abs() > 1e6 {
                return Err(format!(
                    "{what} must be finite and at most 1e6 in size, got {x}"
                ));
            }
            Ok(x)
        };
        match text.trim().split_once('=') {
            None if text.trim() == "sign-flip" => Ok(Corruption::SignFlip),
            None if text.trim() == "stall" => Ok(Corruption::Stall),
            Some(("scale", k)) => number(k, "scale=K: K").map(Corruption::Scale),
            Some(("noise", s)) => match number(s, "noise=S: S")? {
                s if s > 0.0 => Ok(Corruption::Noise(s)),
                s => Err(format!("noise=S: S must be positive, got {s}")),
            },
            _ => Err(format!(
                "{text:?} is not a corruption: use sign-flip, scale=K, noise=S or stall"
            )),
        }
    }

    /// Corrupts `update` in place; noise is drawn from `seed` (the task's), so a rerun
    /// repeats it.
    pub fn apply(self, update: &mut [NamedTensor], seed: u64) {
        if self == Corruption::Stall {
            // Nothing is ever sent to corrupt.
            return;
        }
        let mut rng = SplitMix64(seed ^ 0x9e37_79b9_7f4a_7c15);
        for t in update.iter_mut() {
            for v in t.data.iter_mut() {
                *v = match self {
                    Corruption::SignFlip => -*v,
                    Corruption::Scale(k) => *v * k,
                    Corruption::Noise(s) => *v + s * rng.gaussian(),
                    Corruption::Stall => *v,
                };
            }
        }
    }
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::SignFlip => write!(f, "sign-flip"),
            Corruption::Scale(k) => write!(f, "scale={k}"),
            Corruption::Noise(s) => write!(f, "noise={s}"),
            Corruption::Stall => write!(f, "stall"),
        }
    }
}

/// A small, seeded generator: no dependency for a test mode (and compression's stochastic
/// rounding).
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Uniform in [0, 1), in steps of 2⁻²⁴.
    pub(crate) fn unit_f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u32 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    fn gaussian(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "w".into(),
            shape: vec![4],
            data: vec![1.0, -2.0, 0.5, 0.0],
        }]
    }

    #[test]
    fn modes_parse_and_refuse_what_they_must() {
        assert_eq!(Corruption::parse("sign-flip"), Ok(Corruption::SignFlip));
        assert_eq!(Corruption::parse("scale=-5"), Ok(Corruption::Scale(-5.0)));
        assert_eq!(Corruption::parse("noise=0.5"), Ok(Corruption::Noise(0.5)));
        assert_eq!(Corruption::parse("stall"), Ok(Corruption::Stall));
        assert_eq!(
            Corruption::parse(&Corruption::Stall.to_string()),
            Ok(Corruption::Stall)
        );
        for bad in [
            "flip",
            "scale=",
            "scale=inf",
            "noise=0",
            "noise=-1",
            "scale=1e9",
            "",
        ] {
            assert!(Corruption::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Corruption::Scale(-5.0).to_string(), "scale=-5");
    }

    #[test]
    fn corruptions_do_what_they_say() {
        let mut u = update();
        Corruption::SignFlip.apply(&mut u, 1);
        assert_eq!(u[0].data, vec![-1.0, 2.0, -0.5, 0.0]);
        let mut u = update();
        Corruption::Scale(3.0).apply(&mut u, 1);
        assert_eq!(u[0].data, vec![3.0, -6.0, 1.5, 0.0]);
        let big = vec![NamedTensor {
            name: "w".into(),
            shape: vec![20_000],
            data: vec![0.0; 20_000],
        }];
        let mut a = big.clone();
        Corruption::Noise(2.0).apply(&mut a, 7);
        let mut b = big.clone();
        Corruption::Noise(2.0).apply(&mut b, 7);
        assert_eq!(a, b, "the same seed, the same noise");
        let n = a[0].data.len() as f64;
        let mean = a[0].data.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = a[0]
            .data
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }
}
