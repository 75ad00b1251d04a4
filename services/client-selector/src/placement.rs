//! Which candidates an offer may go to beyond holding the dataset: a job whose training
//! runs on a GPU (`training.device: cuda`, the request's `gpus`) only to parties with that
//! many GPUs free. The others are named with the reason, so that a round that cannot find
//! enough says why at the offer rather than failing mid-round on a party without one.

/// Splits `candidates` into those with at least `need` free GPUs (all of them when `need`
/// is 0) and the others, each with why it is left out.
pub fn split_by_gpus<T>(
    candidates: Vec<T>,
    need: u32,
    free_gpus: impl Fn(&T) -> u32,
) -> (Vec<T>, Vec<(T, String)>) {
    if need == 0 {
        return (candidates, Vec::new());
    }
    let mut fit = Vec::new();
    let mut left_out = Vec::new();
    for c in candidates {
        let free = free_gpus(&c);
        if free >= need {
            fit.push(c);
        } else {
            left_out.push((c, no_gpu_reason(free, need)));
        }
    }
    (fit, left_out)
}

/// Why a party with `free` GPUs free is not offered a task needing `need`.
pub fn no_gpu_reason(free: u32, need: u32) -> String {
    let has = match free {
        0 => "it has no free GPU".to_string(),
        n => format!("it has {n} free GPU(s)"),
    };
    format!(
        "not offered: the job's training.device is cuda, which needs {need} free GPU(s), and {has}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_need_every_candidate_fits() {
        let (fit, out) = split_by_gpus(vec![("a", 0), ("b", 2)], 0, |c| c.1);
        assert_eq!(fit, vec![("a", 0), ("b", 2)]);
        assert!(out.is_empty());
    }

    #[test]
    fn a_gpu_need_keeps_only_parties_with_enough_free_gpus_and_says_why_of_the_rest() {
        let (fit, out) = split_by_gpus(vec![("a", 0), ("b", 1), ("c", 2)], 1, |c| c.1);
        assert_eq!(fit, vec![("b", 1), ("c", 2)]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, ("a", 0));
        assert!(out[0].1.contains("training.device is cuda"), "{}", out[0].1);
        assert!(out[0].1.contains("no free GPU"), "{}", out[0].1);
        let (fit, out) = split_by_gpus(vec![("b", 1)], 2, |c| c.1);
        assert!(fit.is_empty());
        assert!(
            out[0]
                .1
                .contains("needs 2 free GPU(s), and it has 1 free GPU(s)"),
            "{}",
            out[0].1
        );
    }
}
