//! How a round's parties are drawn among the candidates (`clients.selection`), and the scores
//! the draws weigh them by. No I/O: `registry.rs` gathers what each candidate registered,
//! reported and did; this file turns that into scores, weights and draws.
//!
//! Every strategy but `random` is a weighted draw without replacement (Efraimidis–Spirakis:
//! each candidate gets the key u^(1/w), u uniform in (0, 1), and the largest keys win): a
//! party's chance grows with its weight, yet every party of positive weight keeps a chance.
//! That matters in federated learning, where a party left out every round is data the model
//! never sees; top-k would train on the same few parties round after round.
//!
//! - `data`: the party's samples of the job's dataset.
//! - `resource`: [`resource_scores`]: free CPU, memory (and GPUs when any candidate has one),
//!   each as a share of the most any candidate has free, averaged; a party with no free task
//!   slot, CPU or memory weighs 0 and is never drawn.
//! - `reliability`: [`reliability_score`] p, a smoothed, recency-weighted success rate of the
//!   party's training tasks as their coordinators judged them, drawn with its odds p/(1 − p)
//!   = (recent finished + 1) / (recent unfinished + 1). Odds rather than p itself: p of a
//!   party that always finishes (11/12 at best) and of one that never does (1/12) differ
//!   elevenfold, their odds 121-fold, so a party that keeps timing out is drawn in about 1 %
//!   of rounds of 3 of 5 once its record is full (p would leave it about 15 % after 20
//!   rounds, each of which it holds up to the round timeout). Never 0: it is still drawn now
//!   and then, and can mend its record.

use cohort_store::clients::Reliability;
use rand::Rng;

/// How the parties offered a round's tasks are picked among those that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Uniformly at random (every weight 1).
    Random,
    /// Chances proportional to samples of the job's dataset.
    Data,
    /// Chances proportional to the resource score; no free capacity, no chance.
    Resource,
    /// Chances proportional to the reliability score.
    Reliability,
}

impl Pick {
    /// From the wire's `selection` ("" is random); None for an unknown one.
    pub fn parse(selection: &str) -> Option<Pick> {
        match selection {
            "" | "random" => Some(Pick::Random),
            "data" => Some(Pick::Data),
            "resource" => Some(Pick::Resource),
            "reliability" => Some(Pick::Reliability),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Pick::Random => "random",
            Pick::Data => "data",
            Pick::Resource => "resource",
            Pick::Reliability => "reliability",
        }
    }

    /// The weight a draw gives a candidate of `score` (0: never drawn).
    pub fn weight(self, score: f64) -> f64 {
        match self {
            Pick::Random | Pick::Data | Pick::Resource => score,
            // The odds of finishing; a score of 1 (impossible from a record) would be endless.
            Pick::Reliability if score < 1.0 => score / (1.0 - score),
            Pick::Reliability => f64::MAX,
        }
    }

    /// Each candidate's score under this strategy: 1 (random), its samples (data), its
    /// resource score (resource) or its reliability score (reliability). What the round
    /// record shows; the draw weighs it by [`Pick::weight`].
    pub fn scores(self, candidates: &[Traits]) -> Vec<f64> {
        match self {
            Pick::Random => vec![1.0; candidates.len()],
            Pick::Data => candidates.iter().map(|c| c.samples.max(1) as f64).collect(),
            Pick::Resource => {
                let capacity: Vec<Capacity> = candidates.iter().map(|c| c.capacity).collect();
                resource_scores(&capacity)
            }
            Pick::Reliability => candidates
                .iter()
                .map(|c| reliability_score(&c.reliability))
                .collect(),
        }
    }
}

/// What selection knows of one candidate.
#[derive(Debug, Clone, Default)]
pub struct Traits {
    /// Samples of the job's dataset it registered.
    pub samples: u64,
    pub capacity: Capacity,
    pub reliability: Reliability,
}

/// What a party has free for a new task, as client-selector bounds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
    /// Tasks it may still take (its `max_tasks` less those it runs).
    pub slots: u32,
}

impl Capacity {
    /// Whether a task could run there now.
    pub fn has_room(&self) -> bool {
        self.slots > 0 && self.cpu_millis > 0 && self.memory_bytes > 0
    }
}

/// The resource score of each candidate, in (0, 1], or 0 for one with no room: for free
/// CPU, free memory and (when any candidate has a free GPU) free GPUs, the candidate's
/// figure as a share of the largest among the candidates with room, averaged over those
/// dimensions. Relative, so no unit weighs more than another: the best-provisioned party
/// scores 1 in each dimension it leads.
pub fn resource_scores(candidates: &[Capacity]) -> Vec<f64> {
    let roomy = || candidates.iter().filter(|c| c.has_room());
    let max_cpu = roomy().map(|c| c.cpu_millis).max().unwrap_or(0);
    let max_memory = roomy().map(|c| c.memory_bytes).max().unwrap_or(0);
    let max_gpus = roomy().map(|c| c.gpus).max().unwrap_or(0);
    let share = |v: f64, max: f64| if max > 0.0 { v / max } else { 0.0 };
    candidates
        .iter()
        .map(|c| {
            if !c.has_room() {
                return 0.0;
            }
            let mut parts = vec![
                share(c.cpu_millis as f64, max_cpu as f64),
                share(c.memory_bytes as f64, max_memory as f64),
            ];
            if max_gpus > 0 {
                parts.push(share(f64::from(c.gpus), f64::from(max_gpus)));
            }
            parts.iter().sum::<f64>() / parts.len() as f64
        })
        .collect()
}

/// Prior successes and failures: a party with no history scores 1/2.
const PRIOR_FINISHED: f64 = 1.0;
const PRIOR_UNFINISHED: f64 = 1.0;

/// (recent finished + 1) / (recent finished + recent unfinished + 2): the mean of a Beta(1, 1)
/// prior updated with the party's recency-weighted results (each result's weight shrinks by
/// `RELIABILITY_DECAY` = 0.9 with every later one, so about the last ten count). In (0, 1):
/// 1/2 with no history, 11/12 at best and 1/12 at worst once ten or more results weigh in.
pub fn reliability_score(r: &Reliability) -> f64 {
    let finished = finite_count(r.recent_finished);
    let unfinished = finite_count(r.recent_unfinished);
    (finished + PRIOR_FINISHED) / (finished + unfinished + PRIOR_FINISHED + PRIOR_UNFINISHED)
}

/// A stored recent count as a number the score can use (a corrupt NaN or negative reads 0).
fn finite_count(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// Draws up to `count` of the candidates without replacement, each with a chance
/// proportional to its weight (weights of 0, or not finite, are never drawn): the indices, in
/// the order drawn (Efraimidis–Spirakis keys; ln(u)/w orders as u^(1/w) does, without
/// underflow).
pub fn draw<R: Rng>(weights: &[f64], count: usize, rng: &mut R) -> Vec<usize> {
    let mut keyed: Vec<(f64, usize)> = weights
        .iter()
        .enumerate()
        .filter(|(_, w)| w.is_finite() && **w > 0.0)
        .map(|(i, w)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            (u.ln() / w, i)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
    keyed.truncate(count);
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// The seed of a round's draw: the same job seed, round and kind draw the same parties from
/// the same candidates (SplitMix64's finaliser over the mixed inputs).
pub fn draw_seed(task_seed: u64, kind: i32) -> u64 {
    let mut z = task_seed ^ (u64::from(kind as u32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_store::clients::TaskResult;
    use rand::SeedableRng as _;

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    /// How often each candidate is drawn first, over `draws` draws of one.
    fn first_shares(weights: &[f64], draws: u32, seed: u64) -> Vec<f64> {
        let mut rng = rng(seed);
        let mut first = vec![0u32; weights.len()];
        for _ in 0..draws {
            first[draw(weights, 1, &mut rng)[0]] += 1;
        }
        first
            .iter()
            .map(|n| f64::from(*n) / f64::from(draws))
            .collect()
    }

    #[test]
    fn draws_favour_weight_and_never_take_a_zero() {
        let shares = first_shares(&[1.0, 3.0, 6.0, 0.0], 4000, 7);
        for (i, want) in [0.1, 0.3, 0.6, 0.0].into_iter().enumerate() {
            assert!(
                (shares[i] - want).abs() < 0.03,
                "candidate {i}: {} vs {want} ({shares:?})",
                shares[i]
            );
        }
        let mut r = rng(1);
        // Distinct, as many as asked, never more than have weight.
        let two = draw(&[1.0, 1.0, 1e6], 2, &mut r);
        assert_eq!(two.len(), 2);
        assert_ne!(two[0], two[1]);
        assert_eq!(draw(&[5.0, 0.0, f64::NAN, -1.0], 9, &mut r), vec![0]);
        assert!(draw(&[], 3, &mut r).is_empty());
        // A seed repeats the draw.
        let w = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(draw(&w, 3, &mut rng(42)), draw(&w, 3, &mut rng(42)));
    }

    #[test]
    fn draw_seeds_are_fixed_and_differ_by_kind() {
        // Pinned: a change here changes every seeded job's parties.
        assert_eq!(draw_seed(42, 1), draw_seed(42, 1));
        assert_ne!(draw_seed(42, 1), draw_seed(42, 2));
        assert_ne!(draw_seed(42, 1), draw_seed(43, 1));
        assert_eq!(draw_seed(42, 1), 0xbdd7_3226_2feb_6e95);
    }

    fn capacity(cpu_millis: u64, memory_gib: u64, gpus: u32, slots: u32) -> Capacity {
        Capacity {
            cpu_millis,
            memory_bytes: memory_gib << 30,
            gpus,
            slots,
        }
    }

    #[test]
    fn resource_scores_average_each_resource_as_a_share_of_the_best() {
        let scores = resource_scores(&[
            capacity(4000, 8, 0, 2),
            capacity(1000, 2, 0, 1),
            capacity(2000, 8, 0, 1),
            // No free slot, CPU or memory: no room, whatever else it has.
            capacity(64_000, 512, 0, 0),
            capacity(0, 512, 0, 2),
            capacity(64_000, 0, 0, 2),
        ]);
        let want = [1.0, (0.25 + 0.25) / 2.0, (0.5 + 1.0) / 2.0, 0.0, 0.0, 0.0];
        for (got, want) in scores.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{scores:?}");
        }
        // GPUs count once any candidate has one free.
        let scores = resource_scores(&[capacity(1000, 1, 2, 1), capacity(1000, 1, 0, 1)]);
        assert_eq!(scores, vec![1.0, 2.0 / 3.0]);
        assert!(resource_scores(&[]).is_empty());
        assert_eq!(resource_scores(&[capacity(0, 0, 0, 0)]), vec![0.0]);
    }

    #[test]
    fn reliability_scores_smooth_and_forget_slowly() {
        let none = Reliability::default();
        assert_eq!(reliability_score(&none), 0.5);
        let after = |results: &[TaskResult]| {
            results
                .iter()
                .fold(Reliability::default(), |r, t| r.after(*t, 1))
        };
        use TaskResult::*;
        let good = after(&[Finished; 30]);
        let bad = after(&[TimedOut; 30]);
        assert!((reliability_score(&good) - 11.0 / 12.0).abs() < 0.01);
        assert!((reliability_score(&bad) - 1.0 / 12.0).abs() < 0.01);
        // Recent results weigh more: a party that failed and then mended itself beats one
        // that did well and then began to fail, with the same counts.
        let mended = after(&[Failed, Failed, Failed, Finished, Finished, Finished]);
        let slipping = after(&[Finished, Finished, Finished, Failed, Failed, Failed]);
        // (2.71 + 1) / 6.6855 = 0.555 against (1.9755 + 1) / 6.6855 = 0.445.
        assert!((reliability_score(&mended) - 0.555).abs() < 0.001);
        assert!((reliability_score(&slipping) - 0.445).abs() < 0.001);
        // One failure among many successes costs little; corrupt counts read as none.
        let one_miss = after(&[Finished, Finished, Finished, Finished, TimedOut]);
        assert!(reliability_score(&one_miss) > 0.6);
        let corrupt = Reliability {
            recent_finished: f64::NAN,
            recent_unfinished: -3.0,
            ..Reliability::default()
        };
        assert_eq!(reliability_score(&corrupt), 0.5);
    }

    #[test]
    fn scores_and_weights_follow_the_strategy() {
        let traits = [
            Traits {
                samples: 100,
                capacity: capacity(1000, 1, 0, 1),
                reliability: Reliability::default(),
            },
            Traits {
                samples: 0,
                capacity: capacity(0, 1, 0, 1),
                reliability: Reliability::default().after(TaskResult::Finished, 1),
            },
        ];
        assert_eq!(Pick::Random.scores(&traits), vec![1.0, 1.0]);
        assert_eq!(Pick::Data.scores(&traits), vec![100.0, 1.0]);
        assert_eq!(Pick::Resource.scores(&traits), vec![1.0, 0.0]);
        assert_eq!(Pick::Reliability.scores(&traits), vec![0.5, 2.0 / 3.0]);
        // Weights: the score, but reliability draws by the odds of finishing.
        assert_eq!(Pick::Data.weight(100.0), 100.0);
        assert_eq!(Pick::Resource.weight(0.0), 0.0);
        assert_eq!(Pick::Reliability.weight(0.5), 1.0);
        assert!((Pick::Reliability.weight(2.0 / 3.0) - 2.0).abs() < 1e-12);
        assert!((Pick::Reliability.weight(1.0 / 12.0) - 1.0 / 11.0).abs() < 1e-12);
        assert!(Pick::Reliability.weight(1.0).is_finite());
        for (name, pick) in [
            ("", Pick::Random),
            ("random", Pick::Random),
            ("data", Pick::Data),
            ("resource", Pick::Resource),
            ("reliability", Pick::Reliability),
        ] {
            assert_eq!(Pick::parse(name), Some(pick));
        }
        assert_eq!(Pick::parse("fastest"), None);
    }

    /// One job of `rounds` rounds drawing `per_round` of four parties that always finish and
    /// one that always times out: in which rounds the latter was drawn.
    fn rounds_drawing_the_straggler(rounds: u32, per_round: usize, seed: u64) -> Vec<u32> {
        use TaskResult::*;
        let mut r = rng(seed);
        let mut records = vec![Reliability::default(); 5];
        let mut drawn = Vec::new();
        for round in 1..=rounds {
            let traits: Vec<Traits> = records
                .iter()
                .map(|rec| Traits {
                    reliability: rec.clone(),
                    ..Traits::default()
                })
                .collect();
            let weights: Vec<f64> = Pick::Reliability
                .scores(&traits)
                .into_iter()
                .map(|s| Pick::Reliability.weight(s))
                .collect();
            for i in draw(&weights, per_round, &mut r) {
                let result = if i == 4 { TimedOut } else { Finished };
                records[i] = records[i].after(result, 1);
                if i == 4 {
                    drawn.push(round);
                }
            }
        }
        drawn
    }

    /// The figure the reliability integration test bounds, computed over many seeds: in a job
    /// of 20 rounds of 3 of 5 parties, how often is the party that always times out drawn in
    /// rounds 6 to 20? And in the long run, is it still drawn now and then?
    #[test]
    fn a_party_that_always_times_out_is_drawn_rarely_but_not_never() {
        let runs = 2000;
        let (mut later, mut over) = (0usize, 0u32);
        for seed in 0..runs {
            let n = rounds_drawing_the_straggler(20, 3, seed)
                .iter()
                .filter(|r| **r > 5)
                .count();
            later += n;
            over += u32::from(n * 5 > 15);
        }
        let share = later as f64 / (runs as f64 * 15.0);
        let over_share = f64::from(over) / runs as f64;
        eprintln!(
            "a party that always times out, 3 of 5 a round: drawn in {share:.3} of rounds 6-20; \
             more than 20 % in {over_share:.4} of jobs"
        );
        assert!(share < 0.10, "{share}");
        assert!(over_share < 0.02, "{over_share}");
        let long = rounds_drawing_the_straggler(2000, 3, 1);
        let late = long.iter().filter(|r| **r > 100).count();
        eprintln!("over rounds 101-2000: drawn {late} times");
        assert!(late > 0 && late < 60, "{late}");
    }
}
