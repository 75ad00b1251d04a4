//! Whole rounds through [`Party`] and [`Server`] with real crypto: sums with and without
//! dropouts against plain FedAvg, the threshold, the statistics of what the server sees, and
//! the refusals that keep individual updates hidden.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::*;
use cohort_core::{ErrorKind, HasKind};

const CLIP: f32 = 1.0;
const JOB: &str = "job-7";

pub(crate) fn round_id(round: u64) -> RoundId {
    RoundId::new(JOB, round)
}

/// A round of `n` parties "party-1".."party-n" (indices 0..n) driven step by step.
pub(crate) struct Fixture {
    pub(crate) rng: StdRng,
    pub(crate) server: Server,
    pub(crate) parties: Vec<Party>,
    pub(crate) inputs: Vec<Vec<f32>>,
    pub(crate) roster: Roster,
    pub(crate) request: Option<UnmaskRequest>,
    /// Every masked chunk the server received, per party index: the tap on the wire.
    pub(crate) seen: Vec<Vec<u32>>,
}

fn uniform_inputs(rng: &mut StdRng, n: usize, len: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(-CLIP..=CLIP)).collect())
        .collect()
}

impl Fixture {
    /// Parties created and advertised, the roster published.
    pub(crate) fn advertised(n: usize, threshold: usize, len: usize, seed: u64) -> Fixture {
        Fixture::advertised_in(round_id(1), n, threshold, len, seed)
    }

    pub(crate) fn advertised_in(
        round: RoundId,
        n: usize,
        threshold: usize,
        len: usize,
        seed: u64,
    ) -> Fixture {
        Fixture::advertised_over(round, Neighbours::Complete, n, threshold, len, seed)
    }

    pub(crate) fn advertised_over(
        round: RoundId,
        neighbours: Neighbours,
        n: usize,
        threshold: usize,
        len: usize,
        seed: u64,
    ) -> Fixture {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut server = Server::new(ServerConfig {
            round: round.clone(),
            threshold,
            clip: CLIP,
            vector_len: len,
            neighbours,
        })
        .expect("server");
        let parties: Vec<Party> = (1..=n)
            .map(|i| {
                Party::new(round.clone(), format!("party-{i}"), CLIP, &mut rng).expect("party")
            })
            .collect();
        for p in &parties {
            server
                .receive_advertisement(p.advertise())
                .expect("advertise");
        }
        let roster = server.close_advertising().expect("roster");
        let inputs = uniform_inputs(&mut rng, n, len);
        Fixture {
            rng,
            server,
            parties,
            inputs,
            roster,
            request: None,
            seen: vec![Vec::new(); n],
        }
    }

    pub(crate) fn id(&self, i: usize) -> String {
        self.parties[i].id().to_string()
    }

    /// Parties `who` share their keys; the server closes sharing and delivers.
    pub(crate) fn share(&mut self, who: &[usize]) -> Vec<ShareDelivery> {
        for &i in who {
            let shares = self.parties[i]
                .share_keys(&self.roster, &mut self.rng)
                .expect("share keys");
            let id = self.id(i);
            self.server.receive_shares(&id, shares).expect("shares");
        }
        self.server.close_sharing().expect("close sharing")
    }

    pub(crate) fn share_and_deliver(&mut self, who: &[usize]) {
        for delivery in self.share(who) {
            let i = self.index(&delivery.recipient);
            self.parties[i].receive_shares(&delivery).expect("deliver");
        }
    }

    pub(crate) fn index(&self, id: &str) -> usize {
        self.parties
            .iter()
            .position(|p| p.id() == id)
            .expect("known party")
    }

    /// Party `i` masks its input in chunks of `chunk` elements and streams them to the server.
    pub(crate) fn send_masked(&mut self, i: usize, chunk: usize) {
        let id = self.id(i);
        for (k, values) in self.inputs[i].chunks(chunk).enumerate() {
            let offset = (k * chunk) as u64;
            let masked = self.parties[i].mask(offset, values).expect("mask");
            self.seen[i].extend_from_slice(&masked);
            self.server
                .receive_masked_chunk(&id, offset, &masked)
                .expect("masked chunk");
        }
    }

    pub(crate) fn close_masking(&mut self) -> UnmaskRequest {
        let request = self.server.close_masking().expect("close masking");
        self.request = Some(request.clone());
        request
    }

    /// Survivors `who` answer the unmask request.
    pub(crate) fn answer(&mut self, who: &[usize]) {
        let request = self.request.clone().expect("request");
        for &i in who {
            let response = self.parties[i].unmask(&request).expect("unmask");
            let id = self.id(i);
            self.server.receive_unmask(&id, response).expect("answer");
        }
    }

    /// The server's `finish` (which consumes it), leaving a fresh server behind.
    pub(crate) fn finish(&mut self) -> Result<Aggregate> {
        let fresh = Server::new(self.server.config().clone()).expect("server");
        std::mem::replace(&mut self.server, fresh).finish()
    }

    pub(crate) fn encoded(&self, i: usize) -> Vec<u32> {
        let encoding = Encoding::new(CLIP, self.roster.len()).expect("encoding");
        let mut out = vec![0u32; self.inputs[i].len()];
        encoding
            .encode(0, &self.inputs[i], &mut out)
            .expect("encode");
        out
    }

    /// Σ of the encoded inputs of `who`, in the ring.
    pub(crate) fn encoded_sum(&self, who: &[usize]) -> Vec<u32> {
        let mut sum = vec![0u32; self.inputs[0].len()];
        for &i in who {
            for (s, e) in sum.iter_mut().zip(self.encoded(i)) {
                *s = s.wrapping_add(e);
            }
        }
        sum
    }

    /// Plain FedAvg (unweighted, f64) of the inputs of `who`.
    pub(crate) fn plain_mean(&self, who: &[usize]) -> Vec<f64> {
        let mut mean = vec![0f64; self.inputs[0].len()];
        for &i in who {
            for (m, x) in mean.iter_mut().zip(&self.inputs[i]) {
                *m += f64::from(*x);
            }
        }
        mean.iter().map(|m| m / who.len() as f64).collect()
    }
}

pub(crate) fn assert_mean_within_bound(aggregate: &Aggregate, expected: &[f64]) {
    let bound = aggregate.mean_error_bound();
    let mean = aggregate.decode_mean();
    let worst = mean
        .iter()
        .zip(expected)
        .map(|(m, e)| (f64::from(*m) - e).abs())
        .fold(0.0, f64::max);
    assert!(worst <= bound, "worst error {worst} over the bound {bound}");
}

pub(crate) fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma).powi(2);
        vb += (y - mb).powi(2);
    }
    cov / (va.sqrt() * vb.sqrt())
}

#[test]
fn five_parties_without_dropouts_sum_exactly_and_average_within_the_bound() {
    let all = [0, 1, 2, 3, 4];
    let mut f = Fixture::advertised(5, 3, 10_000, 1);
    f.share_and_deliver(&all);
    for i in all {
        f.send_masked(i, 4096);
    }
    let request = f.close_masking();
    assert!(request.dropped.is_empty());
    assert_eq!(request.survivors.len(), 5);
    f.answer(&all);
    let aggregate = f.finish().expect("finish");
    assert_eq!(aggregate.contributors().len(), 5);
    assert_eq!(aggregate.ring_sum(), f.encoded_sum(&all).as_slice());
    // The stated bound: 1/(2·scale) + C·2^-24 (+ f64 slack), about 6.1e-8 for n = 5, C = 1.
    let bound = aggregate.mean_error_bound();
    assert!(bound < 6.2e-8 && bound > 5.9e-8, "bound {bound}");
    assert_mean_within_bound(&aggregate, &f.plain_mean(&all));
}

#[test]
fn one_drop_before_masked_input_and_one_after_leave_the_right_sum() {
    let mut f = Fixture::advertised(5, 3, 10_000, 2);
    f.share_and_deliver(&[0, 1, 2, 3, 4]);
    // party-2 (index 1) shared its keys and then dropped: no masked input.
    // party-4 (index 3) sends its masked input and drops before unmasking.
    for i in [0, 2, 3, 4] {
        f.send_masked(i, 3000);
    }
    let request = f.close_masking();
    assert_eq!(request.dropped, vec!["party-2".to_string()]);
    assert_eq!(
        request.survivors,
        ["party-1", "party-3", "party-4", "party-5"].map(String::from)
    );
    f.answer(&[0, 2, 4]);
    let aggregate = f.finish().expect("finish");
    // The sum holds every input that arrived whole, party-4's too.
    let contributors = [0, 2, 3, 4];
    assert_eq!(
        aggregate.ring_sum(),
        f.encoded_sum(&contributors).as_slice()
    );
    assert_mean_within_bound(&aggregate, &f.plain_mean(&contributors));
    let sum = aggregate.decode_sum();
    let bound = aggregate.sum_error_bound();
    for (k, s) in sum.iter().enumerate().step_by(97) {
        let exact: f64 = contributors
            .iter()
            .map(|&i| f64::from(f.inputs[i][k]))
            .sum();
        assert!((f64::from(*s) - exact).abs() <= bound);
    }
}

#[test]
fn a_party_that_never_shared_its_keys_is_outside_the_masks() {
    let mut f = Fixture::advertised(5, 3, 2_000, 3);
    // party-3 advertised and dropped before sharing; party-5 drops before its masked input.
    f.share_and_deliver(&[0, 1, 3, 4]);
    assert_eq!(
        f.parties[0].sharers().expect("sharers"),
        ["party-1", "party-2", "party-4", "party-5"].map(String::from)
    );
    for i in [0, 1, 3] {
        f.send_masked(i, 2_000);
    }
    let request = f.close_masking();
    assert_eq!(request.dropped, vec!["party-5".to_string()]);
    f.answer(&[0, 1, 3]);
    let aggregate = f.finish().expect("finish");
    assert_eq!(aggregate.ring_sum(), f.encoded_sum(&[0, 1, 3]).as_slice());
}

#[test]
fn three_of_five_dropping_fails_the_round_naming_the_threshold() {
    let mut f = Fixture::advertised(5, 3, 1_000, 4);
    f.share_and_deliver(&[0, 1, 2, 3, 4]);
    for i in [0, 4] {
        f.send_masked(i, 1_000);
    }
    let err = f.server.close_masking().expect_err("below threshold");
    assert_eq!(
        err,
        SecAggError::ThresholdNotMet {
            stage: "masked input",
            have: 2,
            threshold: 3,
            parties: "party-1, party-5".into(),
        }
    );
    assert!(err.to_string().contains("threshold t=3"), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    // Three inputs arrive but only two survivors answer: finishing fails the same way.
    let mut f = Fixture::advertised(5, 3, 1_000, 5);
    f.share_and_deliver(&[0, 1, 2, 3, 4]);
    for i in [0, 1, 2] {
        f.send_masked(i, 1_000);
    }
    f.close_masking();
    f.answer(&[0, 1]);
    let err = f.finish().expect_err("two answers");
    assert!(
        matches!(
            err,
            SecAggError::ThresholdNotMet {
                stage: "unmasking",
                have: 2,
                threshold: 3,
                ..
            }
        ),
        "{err}"
    );

    // Fewer than t sharers fail at key sharing.
    let mut f = Fixture::advertised(5, 3, 10, 6);
    for i in [0, 1] {
        let shares = f.parties[i]
            .share_keys(&f.roster, &mut f.rng)
            .expect("share");
        let id = f.id(i);
        f.server.receive_shares(&id, shares).expect("shares");
    }
    assert!(matches!(
        f.server.close_sharing(),
        Err(SecAggError::ThresholdNotMet {
            stage: "key sharing",
            ..
        })
    ));
}

#[test]
fn what_the_server_receives_does_not_correlate_with_an_input_but_the_sum_does() {
    let n = 5;
    let len = 100_000;
    let all: Vec<usize> = (0..n).collect();
    let mut f = Fixture::advertised(n, 3, len, 7);
    f.share_and_deliver(&all);
    for i in 0..n {
        f.send_masked(i, 8192);
    }
    f.close_masking();
    f.answer(&all);
    let inputs: Vec<Vec<f64>> = f
        .inputs
        .iter()
        .map(|v| v.iter().map(|x| f64::from(*x)).collect())
        .collect();
    for (i, (tapped, input)) in f.seen.iter().zip(&inputs).enumerate() {
        // The tap: the masked values as the signed numbers they would encode.
        let seen: Vec<f64> = tapped.iter().map(|m| f64::from(*m as i32)).collect();
        let r = pearson(&seen, input);
        assert!(
            r.abs() < 0.05,
            "party {i}: masked input correlates, r = {r}"
        );
    }
    let aggregate = f.finish().expect("finish");
    let sum: Vec<f64> = aggregate
        .decode_sum()
        .iter()
        .map(|x| f64::from(*x))
        .collect();
    for (i, input) in inputs.iter().enumerate() {
        // Each input is one of five independent uniform terms: r ≈ 1/√5 ≈ 0.45.
        let r = pearson(&sum, input);
        assert!(r > 0.35, "party {i}: the sum should correlate, r = {r}");
    }
}

#[test]
fn masking_chunk_by_chunk_equals_masking_the_whole_vector() {
    let len = CHUNK_ELEMENTS + 1_000;
    let mut f = Fixture::advertised(3, 2, len, 8);
    f.share_and_deliver(&[0, 1, 2]);
    let whole = f.parties[0].mask(0, &f.inputs[0]).expect("whole");
    for chunk in [CHUNK_ELEMENTS, 7_777] {
        let mut pieces = Vec::with_capacity(len);
        for (k, values) in f.inputs[0].chunks(chunk).enumerate() {
            let masked = f.parties[0]
                .mask((k * chunk) as u64, values)
                .expect("chunk");
            pieces.extend(masked);
        }
        assert_eq!(pieces, whole, "chunks of {chunk}");
    }
    // And the server unmasks across the chunk boundary, with party-2 dropped.
    for i in [0, 2] {
        f.send_masked(i, CHUNK_ELEMENTS);
    }
    f.close_masking();
    f.answer(&[0, 2]);
    let aggregate = f.finish().expect("finish");
    assert_eq!(aggregate.ring_sum(), f.encoded_sum(&[0, 2]).as_slice());
}

#[test]
fn a_share_replayed_from_another_round_or_readdressed_fails_authentication() {
    // Round 1's share from party-1 to party-2.
    let mut first = Fixture::advertised_in(round_id(1), 3, 2, 10, 9);
    let old = first.share(&[0, 1, 2]);
    let to_2 = old
        .iter()
        .find(|d| d.recipient == "party-2")
        .and_then(|d| d.shares.iter().find(|s| s.sender == "party-1"))
        .expect("share")
        .clone();

    // Round 2: the server slips round 1's ciphertext in place of party-1's share.
    let mut second = Fixture::advertised_in(round_id(2), 3, 2, 10, 10);
    let mut deliveries = second.share(&[0, 1, 2]);
    let d = deliveries
        .iter_mut()
        .find(|d| d.recipient == "party-2")
        .expect("delivery");
    let slot = d
        .shares
        .iter_mut()
        .find(|s| s.sender == "party-1")
        .expect("slot");
    slot.ciphertext = to_2.ciphertext.clone();
    let err = second.parties[1]
        .receive_shares(d)
        .expect_err("replayed share");
    assert_eq!(
        err,
        SecAggError::ShareAuthentication {
            sender: "party-1".into(),
            recipient: "party-2".into()
        }
    );
    assert_eq!(err.kind(), ErrorKind::Unauthenticated);
    assert_eq!(err.party(), Some("party-1"));

    // A share party-1 addressed to party-2, handed to party-3 as if it were for it.
    let mut third = Fixture::advertised(3, 2, 10, 11);
    let mut deliveries = third.share(&[0, 1, 2]);
    let for_2 = deliveries
        .iter()
        .find(|d| d.recipient == "party-2")
        .and_then(|d| d.shares.iter().find(|s| s.sender == "party-1"))
        .expect("share")
        .ciphertext
        .clone();
    let d3 = deliveries
        .iter_mut()
        .find(|d| d.recipient == "party-3")
        .expect("delivery");
    let slot = d3
        .shares
        .iter_mut()
        .find(|s| s.sender == "party-1")
        .expect("slot");
    slot.ciphertext = for_2;
    let err = third.parties[2]
        .receive_shares(d3)
        .expect_err("readdressed");
    assert_eq!(
        err,
        SecAggError::ShareAuthentication {
            sender: "party-1".into(),
            recipient: "party-3".into()
        }
    );
    // A share re-attributed to another sender fails too (party-2's share to party-3 in
    // party-1's place).
    let mut fourth = Fixture::advertised(3, 2, 10, 12);
    let mut deliveries = fourth.share(&[0, 1, 2]);
    let d3 = deliveries
        .iter_mut()
        .find(|d| d.recipient == "party-3")
        .expect("delivery");
    let from_2 = d3
        .shares
        .iter()
        .find(|s| s.sender == "party-2")
        .expect("share")
        .ciphertext
        .clone();
    d3.shares
        .iter_mut()
        .find(|s| s.sender == "party-1")
        .expect("slot")
        .ciphertext = from_2;
    assert_eq!(
        fourth.parties[2]
            .receive_shares(d3)
            .expect_err("re-attributed"),
        SecAggError::ShareAuthentication {
            sender: "party-1".into(),
            recipient: "party-3".into()
        }
    );
}

#[test]
fn the_server_refuses_shares_sent_in_another_partys_name() {
    let mut f = Fixture::advertised(3, 2, 10, 13);
    let mut shares = f.parties[0]
        .share_keys(&f.roster, &mut f.rng)
        .expect("share");
    shares[0].sender = "party-3".into();
    let err = f
        .server
        .receive_shares("party-1", shares)
        .expect_err("wrong sender");
    assert_eq!(
        err,
        SecAggError::WrongSender {
            claimed: "party-3".into(),
            actual: "party-1".into()
        }
    );
    assert_eq!(err.party(), Some("party-1"));
    let mut shares = f.parties[1]
        .share_keys(&f.roster, &mut f.rng)
        .expect("share");
    shares[0].round = round_id(0);
    assert!(matches!(
        f.server.receive_shares("party-2", shares),
        Err(SecAggError::WrongRound { party, .. }) if party == "party-2"
    ));
    let shares = f.parties[2]
        .share_keys(&f.roster, &mut f.rng)
        .expect("share");
    assert!(matches!(
        f.server.receive_shares("party-3", shares[..1].to_vec()),
        Err(SecAggError::ShareCount {
            got: 1,
            expected: 2,
            ..
        })
    ));
}

#[test]
fn a_survivor_never_reveals_both_shares_of_one_party() {
    let mut f = Fixture::advertised(5, 3, 100, 14);
    f.share_and_deliver(&[0, 1, 2, 3, 4]);
    let all = ["party-1", "party-2", "party-3", "party-4", "party-5"].map(String::from);
    let both = UnmaskRequest {
        round: round_id(1),
        dropped: vec!["party-2".into()],
        survivors: all.to_vec(),
    };
    let err = f.parties[0].unmask(&both).expect_err("both");
    assert_eq!(
        err,
        SecAggError::BothSharesRequested {
            party: "party-2".into()
        }
    );
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);

    // An honest request is answered, the same request again gets the same answer, and a second
    // request that moves party-2 to the other list is refused.
    let first = UnmaskRequest {
        round: round_id(1),
        dropped: vec!["party-2".into()],
        survivors: ["party-1", "party-3", "party-4", "party-5"]
            .map(String::from)
            .to_vec(),
    };
    let answer = f.parties[0].unmask(&first).expect("answer");
    assert_eq!(answer.mask_key_shares.len(), 1);
    assert_eq!(answer.self_mask_shares.len(), 4);
    assert_eq!(f.parties[0].unmask(&first).expect("again"), answer);
    let second = UnmaskRequest {
        round: round_id(1),
        dropped: vec!["party-4".into()],
        survivors: ["party-1", "party-2", "party-3", "party-5"]
            .map(String::from)
            .to_vec(),
    };
    assert!(matches!(
        f.parties[0].unmask(&second),
        Err(SecAggError::InvalidUnmaskRequest(_))
    ));
    // Masking stops once the party has answered.
    assert!(matches!(
        f.parties[0].mask(0, &[0.0]),
        Err(SecAggError::WrongPhase { .. })
    ));

    // Other parties refuse requests below the threshold, leaving a sharer out, or listing
    // them as dropped.
    let few = UnmaskRequest {
        round: round_id(1),
        dropped: ["party-3", "party-4", "party-5"].map(String::from).to_vec(),
        survivors: ["party-1", "party-2"].map(String::from).to_vec(),
    };
    assert!(matches!(
        f.parties[1].unmask(&few),
        Err(SecAggError::ThresholdNotMet { threshold: 3, .. })
    ));
    let left_out = UnmaskRequest {
        round: round_id(1),
        dropped: vec![],
        survivors: ["party-1", "party-2", "party-3", "party-4"]
            .map(String::from)
            .to_vec(),
    };
    assert!(matches!(
        f.parties[1].unmask(&left_out),
        Err(SecAggError::InvalidUnmaskRequest(m)) if m.contains("party-5")
    ));
    let itself_dropped = UnmaskRequest {
        round: round_id(1),
        dropped: vec!["party-2".into()],
        survivors: ["party-1", "party-3", "party-4", "party-5"]
            .map(String::from)
            .to_vec(),
    };
    assert!(matches!(
        f.parties[1].unmask(&itself_dropped),
        Err(SecAggError::InvalidUnmaskRequest(_))
    ));
}

#[test]
fn the_server_refuses_duplicate_parties_and_reused_keys() {
    let mut rng = StdRng::seed_from_u64(15);
    let config = ServerConfig {
        round: round_id(1),
        threshold: 2,
        clip: CLIP,
        vector_len: 10,
        neighbours: Neighbours::Complete,
    };
    let mut server = Server::new(config.clone()).expect("server");
    let a = Party::new(round_id(1), "a", CLIP, &mut rng).expect("party");
    let b = Party::new(round_id(1), "b", CLIP, &mut rng).expect("party");
    server.receive_advertisement(a.advertise()).expect("a");
    assert_eq!(
        server.receive_advertisement(a.advertise()),
        Err(SecAggError::Duplicate {
            party: "a".into(),
            what: "advertisement"
        })
    );
    let mut copycat = b.advertise();
    copycat.s_pk = a.advertise().c_pk;
    let err = server.receive_advertisement(copycat).expect_err("reused");
    assert_eq!(
        err,
        SecAggError::KeyReused {
            party: "b".into(),
            other: "a".into()
        }
    );
    assert_eq!(err.party(), Some("b"));
    let mut same = b.advertise();
    same.s_pk = same.c_pk;
    assert!(matches!(
        server.receive_advertisement(same),
        Err(SecAggError::KeyReused { .. })
    ));
    let mut stale = b.advertise();
    stale.round = round_id(0);
    assert!(matches!(
        server.receive_advertisement(stale),
        Err(SecAggError::WrongRound { .. })
    ));
    // Below t advertisements the roster is not published.
    assert!(matches!(
        server.close_advertising(),
        Err(SecAggError::ThresholdNotMet {
            stage: "advertising",
            ..
        })
    ));
    server.receive_advertisement(b.advertise()).expect("b");
    assert_eq!(server.close_advertising().expect("roster").len(), 2);
    // Thresholds at most n/2 are refused before anything is shared.
    assert!(
        Server::new(ServerConfig {
            threshold: 1,
            ..config
        })
        .is_err()
    );
}

#[test]
fn masked_chunks_must_come_in_order_and_whole() {
    let mut f = Fixture::advertised(3, 2, 100, 16);
    f.share_and_deliver(&[0, 1, 2]);
    let chunk = f.parties[0].mask(0, &f.inputs[0][..50]).expect("mask");
    f.server
        .receive_masked_chunk("party-1", 0, &chunk)
        .expect("first half");
    assert_eq!(f.server.masked_elements_received("party-1"), 50);
    assert_eq!(
        f.server.receive_masked_chunk("party-1", 60, &chunk[..10]),
        Err(SecAggError::ChunkOutOfOrder {
            party: "party-1".into(),
            expected: 50,
            got: 60
        })
    );
    assert!(matches!(
        f.server.receive_masked_chunk("party-1", 50, &[0u32; 51]),
        Err(SecAggError::ChunkOutOfRange { .. })
    ));
    assert!(matches!(
        f.server.receive_masked_chunk("party-9", 0, &[0u32; 1]),
        Err(SecAggError::UnknownParty { .. })
    ));
    f.send_masked(1, 100);
    f.send_masked(2, 100);
    // party-1 stopped half way: its partial input cannot be removed from the sum.
    assert_eq!(
        f.server.close_masking(),
        Err(SecAggError::PartialMaskedInput {
            party: "party-1".into(),
            received: 50,
            expected: 100
        })
    );
}

#[test]
fn a_wrong_share_in_an_answer_fails_reconstruction_instead_of_a_wrong_sum() {
    let all = [0, 1, 2, 3, 4];
    let mut f = Fixture::advertised(5, 3, 100, 17);
    f.share_and_deliver(&all);
    for i in [0, 2, 3, 4] {
        f.send_masked(i, 100);
    }
    let request = f.close_masking();
    for i in [0, 2, 3, 4] {
        let mut response = f.parties[i].unmask(&request).expect("unmask");
        if i == 4 {
            // party-5 answers with another index's share of party-2's key: a share that is
            // well formed, at the right index, and wrong.
            let mut bytes = response.mask_key_shares[0].share.clone();
            bytes[10] ^= 1;
            response.mask_key_shares[0].share = bytes;
        }
        let id = f.id(i);
        f.server.receive_unmask(&id, response).expect("answer");
    }
    let err = f.finish().expect_err("bad share");
    assert!(
        matches!(
            &err,
            SecAggError::Reconstruction { owner, .. }
                | SecAggError::ReconstructionMismatch { party: owner, .. }
                if owner == "party-2"
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::DataLoss);
}

#[test]
fn answers_with_missing_extra_or_misindexed_shares_are_refused_naming_the_party() {
    let all = [0, 1, 2, 3, 4];
    let mut f = Fixture::advertised(5, 3, 10, 18);
    f.share_and_deliver(&all);
    for i in [0, 1, 2, 3] {
        f.send_masked(i, 10);
    }
    let request = f.close_masking();
    let good = f.parties[0].unmask(&request).expect("answer");
    let mut missing = good.clone();
    missing.self_mask_shares.pop();
    assert!(matches!(
        f.server.receive_unmask("party-1", missing),
        Err(SecAggError::Share { party, .. }) if party == "party-1"
    ));
    // party-2 relays party-1's answer as its own: the shares are at party-1's index.
    let mut relayed = good.clone();
    relayed.party = "party-2".into();
    assert!(matches!(
        f.server.receive_unmask("party-2", relayed),
        Err(SecAggError::Share { party, .. }) if party == "party-2"
    ));
    assert!(matches!(
        f.server.receive_unmask("party-2", good.clone()),
        Err(SecAggError::WrongSender { .. })
    ));
    let mut dropped_answer = good.clone();
    dropped_answer.party = "party-5".into();
    assert!(matches!(
        f.server.receive_unmask("party-5", dropped_answer),
        Err(SecAggError::NotSurvivor { .. })
    ));
    f.server
        .receive_unmask("party-1", good.clone())
        .expect("good");
    assert!(matches!(
        f.server.receive_unmask("party-1", good),
        Err(SecAggError::Duplicate { .. })
    ));
}

#[test]
fn updates_clipped_to_the_norm_average_like_plain_fedavg() {
    // Gaussian-ish updates of norm well over the clip, clipped on the party with clip_factor.
    let n = 4;
    let len = 5_000;
    let mut f = Fixture::advertised(n, 3, len, 19);
    for input in &mut f.inputs {
        for x in input.iter_mut() {
            *x *= 3.0;
        }
        let norm = input
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        let factor = clip_factor(norm, CLIP);
        assert!(factor < 1.0);
        for x in input.iter_mut() {
            *x = (f64::from(*x) * factor) as f32;
        }
    }
    let all: Vec<usize> = (0..n).collect();
    f.share_and_deliver(&all);
    for i in 0..n {
        f.send_masked(i, 1_024);
    }
    f.close_masking();
    f.answer(&all);
    let aggregate = f.finish().expect("finish");
    assert_mean_within_bound(&aggregate, &f.plain_mean(&all));
}

#[test]
fn the_state_machines_can_live_behind_a_mutex_in_async_services() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Party>();
    send_sync::<Server>();
    send_sync::<Aggregate>();
    send_sync::<SecAggError>();
}
