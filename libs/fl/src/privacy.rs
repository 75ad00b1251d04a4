//! Differential privacy for federated averaging (DP-FedAvg, McMahan et al., "Learning
//! Differentially Private Recurrent Language Models", ICLR 2018), and its accountant.
//!
//! The mechanism, per round: every update is clipped to L2 norm `clip`, the clipped updates
//! are summed with weight 1 each, Gaussian noise N(0, (z·clip)²) is added to every coordinate
//! of the sum, and the noisy sum is divided by a fixed denominator, the expected cohort
//! (`clients.per_round`). Sample-count weights or the count of updates received as the
//! denominator would let one party's data move the result by more than `clip`, and the
//! noise would no longer cover it. The guarantee is user-level: a user is a party, and
//! whether a party takes part at all is what the noise hides.
//!
//! Where it runs ([`DpAggregation`]): on the coordinator (central DP: it sees each update),
//! or with `privacy.dp.local` on the parties (each clips and adds the full noise before
//! sending, [`LocalDp`]); with secure aggregation clipping moves to the parties and the
//! noise is split across them ([`distributed_noise_std`] with clients.min; the executor's
//! `secagg.rs`, with the same formula in `cohort_core::spec::SecureAggregation`).
//!
//! The accountant ([`Accountant`]) is the Rényi-DP analysis of the sampled Gaussian
//! mechanism (Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
//! Mechanism", 2019) with Poisson sampling at rate q = per_round ÷ eligible parties, as
//! Google's `dp-accounting` computes it (`RdpAccountant`, `DEFAULT_RDP_ORDERS`, the
//! conversion to (ε, δ) of Canonne, Kamath, Steinke 2020). Parties are drawn as a fixed-size
//! cohort, not by Poisson sampling: the accountant treats the draw as Poisson sampling at
//! the same rate, as DP-FedAvg's analysis does.
//!
//! Noise comes from a cryptographically secure generator seeded by the operating system
//! ([`os_noise`]); tests pass their own generator. Its samples are floating-point Gaussians
//! (as in TF Privacy and Opacus), not a discrete mechanism hardened against floating-point
//! attacks.

use rand::{Rng, RngCore, SeedableRng};
use rand_distr::StandardNormal;

use cohort_core::spec::DpSpec;

use crate::FlError;

/// What the coordinator's aggregate does under differential privacy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpAggregation {
    /// The L2 bound every update is clipped to here; None when the parties clip (local DP:
    /// their updates arrive noised, and clipping a noised update here would shrink its
    /// signal with the noise).
    pub clip: Option<f64>,
    /// Standard deviation of the Gaussian noise added here to each coordinate of the sum:
    /// z·clip centrally, 0 when the parties added theirs.
    pub noise_std: f64,
    /// What the noisy sum is divided by: the expected cohort, fixed in advance.
    pub denominator: f64,
}

impl DpAggregation {
    /// The aggregate's part of `dp` for cohorts of `per_round` parties.
    pub fn for_spec(dp: &DpSpec, per_round: u32) -> DpAggregation {
        let denominator = f64::from(per_round.max(1));
        if dp.local {
            DpAggregation {
                clip: None,
                noise_std: 0.0,
                denominator,
            }
        } else {
            DpAggregation {
                clip: Some(dp.clip),
                noise_std: dp.noise_multiplier * dp.clip,
                denominator,
            }
        }
    }
}

/// What a party does to its update under local DP: clip to `clip`, then add N(0, std²) to
/// each coordinate, before anything leaves it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalDp {
    pub clip: f64,
    pub noise_std: f64,
}

impl LocalDp {
    /// The party's part of `dp`: Some only with `privacy.dp.local`.
    pub fn for_spec(dp: &DpSpec) -> Option<LocalDp> {
        dp.local.then_some(LocalDp {
            clip: dp.clip,
            noise_std: dp.noise_multiplier * dp.clip,
        })
    }

    /// Clips `update` (all its tensors as one vector) to the bound and adds the noise.
    /// Returns the update's L2 norm before clipping.
    pub fn apply(&self, update: &mut [cohort_core::NamedTensor], rng: &mut dyn RngCore) -> f64 {
        let norm = update
            .iter()
            .flat_map(|t| &t.data)
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        let scale = clip_scale(norm, self.clip);
        for t in update.iter_mut() {
            for v in &mut t.data {
                let noise = if self.noise_std > 0.0 {
                    self.noise_std * rng.sample::<f64, _>(StandardNormal)
                } else {
                    0.0
                };
                *v = (f64::from(*v) * scale + noise) as f32;
            }
        }
        norm
    }
}

/// What an update of L2 norm `norm` is multiplied by to be within `clip`.
pub fn clip_scale(norm: f64, clip: f64) -> f64 {
    if norm > clip { clip / norm } else { 1.0 }
}

/// The hook for secure aggregation: the standard deviation each of the round's parties adds
/// so that the sum of at least `min_parties` of their noises has the central noise's
/// variance (z·clip)² (distributed noise: the coordinator only sees the masked sum).
pub fn distributed_noise_std(dp: &DpSpec, min_parties: u32) -> f64 {
    dp.noise_multiplier * dp.clip / f64::from(min_parties.max(1)).sqrt()
}

/// A generator for the mechanism's noise: the standard library generator of `rand`
/// (ChaCha12, cryptographically secure), seeded from the operating system.
pub fn os_noise() -> Result<rand::rngs::StdRng, FlError> {
    rand::rngs::StdRng::try_from_os_rng()
        .map_err(|e| FlError::Broken(format!("no randomness from the operating system: {e}")))
}

/// Adds N(0, std²) to every value (f64 sums).
pub(crate) fn add_noise(values: &mut [f64], std: f64, rng: &mut dyn RngCore) {
    if std > 0.0 {
        for v in values {
            *v += std * rng.sample::<f64, _>(StandardNormal);
        }
    }
}

/// The RDP orders of `dp-accounting`'s `RdpAccountant` (`DEFAULT_RDP_ORDERS`, version
/// 0.6.0): 1.1, 1.2, ..., 10.9, then 11..=63, then 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// Rényi DP spent so far by a sampled Gaussian mechanism of one noise multiplier, composed
/// over rounds that may each have their own sampling rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Accountant {
    noise_multiplier: f64,
    orders: Vec<f64>,
    rdp: Vec<f64>,
    steps: u32,
}

impl Accountant {
    pub fn new(noise_multiplier: f64) -> Accountant {
        let orders = default_orders();
        Accountant {
            noise_multiplier,
            rdp: vec![0.0; orders.len()],
            orders,
            steps: 0,
        }
    }

    /// Rounds accounted for.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// Accounts for `steps` rounds at sampling rate `q`.
    pub fn compose(&mut self, q: f64, steps: u32) {
        let one = rdp_sampled_gaussian(q, self.noise_multiplier, &self.orders);
        for (total, r) in self.rdp.iter_mut().zip(one) {
            *total += f64::from(steps) * r;
        }
        self.steps += steps;
    }

    /// ε at `delta` for what was composed so far (infinite without noise).
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon_from_rdp(&self.orders, &self.rdp, delta).0
    }

    /// ε at `delta` once one more round at rate `q` is composed.
    pub fn epsilon_after(&self, q: f64, delta: f64) -> f64 {
        let mut next = self.clone();
        next.compose(q, 1);
        next.epsilon(delta)
    }
}

/// ε at `delta` of `steps` rounds of the sampled Gaussian mechanism (rate `q`, noise
/// multiplier `sigma`).
pub fn epsilon(q: f64, sigma: f64, steps: u32, delta: f64) -> f64 {
    let mut a = Accountant::new(sigma);
    a.compose(q, steps);
    a.epsilon(delta)
}

/// ε at `delta` of `steps` releases of one party's update under local DP, toward whoever
/// sees them: any two datasets give clipped updates up to 2·clip apart, so the Gaussian's
/// effective noise multiplier is z/2, and nothing is sampled (q = 1).
pub fn local_epsilon(noise_multiplier: f64, steps: u32, delta: f64) -> f64 {
    epsilon(1.0, noise_multiplier / 2.0, steps, delta)
}

/// The RDP of one round of the Poisson-sampled Gaussian mechanism at each order
/// (`_compute_rdp_poisson_subsampled_gaussian`).
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, orders: &[f64]) -> Vec<f64> {
    orders
        .iter()
        .map(|&alpha| {
            if q <= 0.0 {
                0.0
            } else if alpha.is_infinite() || sigma <= 0.0 {
                f64::INFINITY
            } else if q >= 1.0 {
                alpha / (2.0 * sigma * sigma)
            } else {
                log_a(q, sigma, alpha) / (alpha - 1.0)
            }
        })
        .collect()
}

/// The best (ε, order) at `delta` over the orders (`compute_epsilon`: Proposition 12 of
/// Canonne, Kamath, Steinke 2020, with its guards for tiny RDP and orders near 1).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    if delta <= 0.0 {
        return if rdp.iter().all(|r| *r == 0.0) {
            (0.0, 0.0)
        } else {
            (f64::INFINITY, 0.0)
        };
    }
    let mut best = (f64::INFINITY, 0.0);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // NaN (an infinite RDP) never wins; the first of equal values does, as argmin.
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

fn log_a(q: f64, sigma: f64, alpha: f64) -> f64 {
    if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    }
}

/// log(x + y) from log x and log y.
fn log_add(logx: f64, logy: f64) -> f64 {
    let (a, b) = if logx < logy {
        (logx, logy)
    } else {
        (logy, logx)
    };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// log of the binomial coefficient (n k), n real: log|Γ| as scipy's `gammaln`.
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log A_α for an integer α, 0 < q < 1 (`_compute_log_a_int`).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let n = alpha as f64;
    for i in 0..=alpha {
        let i = i as f64;
        let log_coef = log_comb(n, i) + i * q.ln() + (n - i) * log1mq;
        let s = log_coef + (i * i - i) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// Terms `log_a_frac` sums at most before giving the order up (`_MAX_STEPS_LOG_A_FRAC`).
const MAX_STEPS_LOG_A_FRAC: u32 = 1000;

/// log A_α for a fractional α, 0 < q < 1 (`_compute_log_a_frac`, Sec. 3.3 of Mironov et
/// al. 2019); infinite when the series does not settle, which leaves the order out.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let half = 0.5f64.ln();
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let i = f64::from(i);
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = half + log_erfc((i - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = half + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// log erfc(x), accurate where erfc(x) underflows (scipy's `log_ndtr` route).
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // The asymptotic series of log erfc at infinity.
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x - 0.5 * x.powi(-2) + 0.625 * x.powi(-4)
        - 37.0 / 24.0 * x.powi(-6)
        + 353.0 / 64.0 * x.powi(-8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ε of the Poisson-sampled Gaussian mechanism from Google's `dp-accounting` 0.6.0
    /// (PyPI), computed on 2026-12-07 with, for each (q, σ, steps, δ):
    ///
    /// ```python
    /// from dp_accounting import dp_event
    /// from dp_accounting.rdp import rdp_privacy_accountant as rdp
    /// acc = rdp.RdpAccountant()  # DEFAULT_RDP_ORDERS, ADD_OR_REMOVE_ONE
    /// acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(σ)), steps)
    /// eps, order = acc.get_epsilon_and_optimal_order(δ)
    /// ```
    ///
    /// with the optimal order it reported: fractional orders take part.
    const REFERENCE: &[(f64, f64, u32, f64, f64, f64)] = &[
        // (q, σ, steps, δ, ε, optimal order)
        (0.01, 1.1, 1000, 1e-5, 1.7117701662429012, 9.6),
        (0.1, 1.0, 100, 1e-5, 7.903850223578231, 3.2),
        (0.3, 1.5, 50, 1e-5, 8.903129875646382, 3.2),
        (1.0, 1.0, 10, 1e-5, 19.05359753163139, 2.5),
        (0.5, 0.8, 20, 1e-4, 20.962430673187253, 1.9),
        (0.6, 2.0, 30, 1e-5, 9.349681652201673, 3.3),
        (0.02, 0.7, 500, 1e-6, 8.77562981528054, 3.1),
        (1.0, 5.0, 100, 1e-3, 8.416496187447095, 2.7),
        (0.3, 1.2, 20, 1e-5, 7.9365973930171405, 3.2),
        (0.05, 4.0, 10000, 1e-5, 6.264461088787069, 4.5),
        (0.001, 1.0, 1, 1e-5, 0.6087728217833737, 14.0),
        (0.2, 0.5, 5, 1e-5, 15.853992792930244, 2.0),
        (0.3, 0.3, 3, 1e-2, 21.209603283940947, 1.4),
    ];

    #[test]
    fn the_accountant_agrees_with_dp_accounting() {
        for &(q, sigma, steps, delta, want, order) in REFERENCE {
            let mut a = Accountant::new(sigma);
            a.compose(q, steps);
            let (got, at) = epsilon_from_rdp(&a.orders, &a.rdp, delta);
            let error = (got - want).abs() / want;
            assert!(
                error < 0.01,
                "q={q} σ={sigma} steps={steps} δ={delta}: ε {got} vs dp-accounting's {want} \
                 ({:.3} %)",
                100.0 * error
            );
            // Far closer than the 1 % asked for: the same computation, not a look-alike.
            assert!(error < 1e-6, "q={q} σ={sigma}: ε {got} vs {want}");
            assert!(
                (at - order).abs() < 1e-9,
                "q={q} σ={sigma}: order {at} vs {order}"
            );
        }
    }

    #[test]
    fn the_orders_are_dp_accountings_defaults() {
        let orders = default_orders();
        assert_eq!(orders.len(), 99 + 53 + 4);
        assert_eq!(orders[0], 1.1);
        assert_eq!(orders[98], 10.9);
        assert_eq!(orders[99], 11.0);
        assert_eq!(orders[151], 63.0);
        assert_eq!(&orders[152..], &[128.0, 256.0, 512.0, 1024.0]);
        // 1 + 10/10 is an integer order, computed as one (as Python's is_integer()).
        assert_eq!(orders[9], 2.0);
    }

    #[test]
    fn rounds_compose_and_each_rate_counts() {
        let (q, sigma, delta) = (0.4, 1.3, 1e-5);
        let mut a = Accountant::new(sigma);
        let mut previous = 0.0;
        for k in 1..=10 {
            let next = a.epsilon_after(q, delta);
            a.compose(q, 1);
            assert_eq!(a.epsilon(delta), next);
            assert!(next > previous, "ε grows with every round");
            assert!((next - epsilon(q, sigma, k, delta)).abs() < 1e-9 * next);
            previous = next;
        }
        // Rounds at two rates: between all at the lower and all at the higher rate.
        let mut mixed = Accountant::new(sigma);
        mixed.compose(0.2, 5);
        mixed.compose(0.6, 5);
        let e = mixed.epsilon(delta);
        assert!(epsilon(0.2, sigma, 10, delta) < e && e < epsilon(0.6, sigma, 10, delta));
    }

    #[test]
    fn no_noise_is_no_guarantee_and_no_rounds_cost_nothing() {
        assert_eq!(epsilon(0.5, 0.0, 1, 1e-5), f64::INFINITY);
        assert_eq!(Accountant::new(1.0).epsilon(1e-5), 0.0);
        assert_eq!(epsilon(0.0, 1.0, 10, 1e-5), 0.0);
        // Local DP: the Gaussian at z/2 and q = 1.
        assert_eq!(local_epsilon(2.0, 3, 1e-5), epsilon(1.0, 1.0, 3, 1e-5));
    }

    #[test]
    fn local_dp_clips_then_adds_noise_of_the_asked_deviation() {
        let t = |data: Vec<f32>| cohort_core::NamedTensor {
            name: "w".into(),
            shape: vec![data.len()],
            data,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let quiet = LocalDp {
            clip: 1.0,
            noise_std: 0.0,
        };
        let mut update = vec![t(vec![3.0, 4.0])];
        assert_eq!(quiet.apply(&mut update, &mut rng), 5.0);
        assert_eq!(update[0].data, vec![0.6, 0.8]);
        let noisy = LocalDp {
            clip: 1.0,
            noise_std: 0.5,
        };
        let mut zeros = vec![t(vec![0.0; 200_000])];
        noisy.apply(&mut zeros, &mut rng);
        let n = zeros[0].data.len() as f64;
        let mean = zeros[0].data.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = zeros[0]
            .data
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "deviation {}", var.sqrt());
    }

    #[test]
    fn distributed_noise_sums_to_the_central_noise() {
        let dp = DpSpec {
            clip: 2.0,
            noise_multiplier: 1.5,
            delta: 1e-5,
            target_epsilon: None,
            local: false,
        };
        let each = distributed_noise_std(&dp, 4);
        assert!((4.0 * each * each - (1.5f64 * 2.0).powi(2)).abs() < 1e-12);
    }
}
