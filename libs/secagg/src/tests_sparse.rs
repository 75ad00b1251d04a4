//! SecAgg+'s sparse graph end to end: a party works with its neighbours only, sums stay exact
//! with dropouts, and the round refuses to unmask when the survivors' graph falls apart or a
//! party's neighbourhood holds fewer than t shares.

use super::tests::{Fixture, assert_mean_within_bound, pearson, round_id};
use crate::*;
use cohort_core::{ErrorKind, HasKind};

fn sparse(n: usize, k: usize, t: usize, len: usize, seed: u64) -> Fixture {
    Fixture::advertised_over(round_id(1), Neighbours::Harary(k), n, t, len, seed)
}

fn ring_order(g: &Graph) -> Vec<usize> {
    g.ring().to_vec()
}

#[test]
fn each_party_shares_with_its_k_neighbours_and_the_sum_is_exact() {
    let n = 20;
    let all: Vec<usize> = (0..n).collect();
    let mut f = sparse(n, 6, 4, 5_000, 21);
    assert_eq!(f.roster.holders(), 7);
    for i in 0..n {
        let shares = f.parties[i]
            .share_keys(&f.roster, &mut f.rng)
            .expect("share");
        assert_eq!(
            shares.len(),
            6,
            "party {i} shares with 6 neighbours, not 19"
        );
        let id = f.id(i);
        f.server.receive_shares(&id, shares).expect("shares");
    }
    for delivery in f.server.close_sharing().expect("close sharing") {
        assert_eq!(delivery.shares.len(), 6);
        let i = f.index(&delivery.recipient);
        f.parties[i].receive_shares(&delivery).expect("deliver");
    }
    for &i in &all {
        f.send_masked(i, 2048);
    }
    f.close_masking();
    f.answer(&all);
    let aggregate = f.finish().expect("finish");
    assert_eq!(aggregate.ring_sum(), f.encoded_sum(&all).as_slice());
    assert_mean_within_bound(&aggregate, &f.plain_mean(&all));
    // What the server saw of one party is noise; the sum is the inputs'.
    let input: Vec<f64> = f.inputs[7].iter().map(|x| f64::from(*x)).collect();
    let seen: Vec<f64> = f.seen[7].iter().map(|x| f64::from(*x)).collect();
    assert!(pearson(&input, &seen).abs() < 0.05);
}

#[test]
fn dropouts_before_and_after_masked_input_leave_the_survivors_sum() {
    let n = 16;
    let mut f = sparse(n, 6, 4, 3_000, 22);
    let all: Vec<usize> = (0..n).collect();
    f.share_and_deliver(&all);
    let order = ring_order(&Graph::of(&f.roster));
    // Two neighbours on the ring drop before their masked input, one more after it.
    let (gone_early, gone_late) = ([order[3], order[4]], order[10]);
    let contributors: Vec<usize> = all
        .iter()
        .copied()
        .filter(|i| !gone_early.contains(i))
        .collect();
    for &i in &contributors {
        f.send_masked(i, 1_000);
    }
    let request = f.close_masking();
    assert_eq!(request.dropped.len(), 2);
    let answering: Vec<usize> = contributors
        .iter()
        .copied()
        .filter(|&i| i != gone_late)
        .collect();
    f.answer(&answering);
    let aggregate = f.finish().expect("finish");
    assert_eq!(
        aggregate.ring_sum(),
        f.encoded_sum(&contributors).as_slice()
    );
    assert_mean_within_bound(&aggregate, &f.plain_mean(&contributors));
}

#[test]
fn survivors_split_into_two_groups_are_never_unmasked() {
    // k = 2: a cycle. Two parties apart on it gone leave two separate paths.
    let n = 10;
    let mut f = sparse(n, 2, 2, 100, 23);
    let all: Vec<usize> = (0..n).collect();
    f.share_and_deliver(&all);
    let order = ring_order(&Graph::of(&f.roster));
    let gone = [order[0], order[5]];
    let survivors: Vec<usize> = all.iter().copied().filter(|i| !gone.contains(i)).collect();
    for &i in &survivors {
        f.send_masked(i, 100);
    }
    let err = f.server.close_masking().expect_err("two groups");
    assert!(matches!(err, SecAggError::Disconnected { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    // A server that asks anyway is refused by every party.
    let request = UnmaskRequest {
        round: round_id(1),
        dropped: gone.iter().map(|&i| f.id(i)).collect(),
        survivors: survivors.iter().map(|&i| f.id(i)).collect(),
    };
    let mut sorted = request.clone();
    sorted.dropped.sort();
    sorted.survivors.sort();
    let err = f.parties[survivors[0]]
        .unmask(&sorted)
        .expect_err("party refuses");
    assert!(matches!(err, SecAggError::Disconnected { .. }), "{err}");
}

#[test]
fn a_neighbourhood_with_fewer_than_t_survivors_fails_naming_the_threshold() {
    // k = 4, t = 3: a party whose four neighbours keep only one alive cannot be unmasked.
    let n = 12;
    let mut f = sparse(n, 4, 3, 100, 24);
    let all: Vec<usize> = (0..n).collect();
    f.share_and_deliver(&all);
    let order = ring_order(&Graph::of(&f.roster));
    // order[5]'s neighbours are order[3], order[4], order[6], order[7]; drop three of them.
    let gone = [order[3], order[4], order[6]];
    for &i in all.iter().filter(|i| !gone.contains(i)) {
        f.send_masked(i, 100);
    }
    let err = f.server.close_masking().expect_err("neighbourhood below t");
    match &err {
        SecAggError::ThresholdNotMet {
            threshold, have, ..
        } => assert_eq!((*threshold, *have), (3, 2)),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("threshold t=3"), "{err}");
}

#[test]
fn shares_for_a_party_outside_the_neighbourhood_are_refused() {
    let n = 12;
    let mut f = sparse(n, 4, 3, 10, 25);
    let graph = Graph::of(&f.roster);
    let mut shares = f.parties[0]
        .share_keys(&f.roster, &mut f.rng)
        .expect("share");
    let stranger = (1..n).find(|&q| !graph.adjacent(0, q)).expect("a stranger");
    shares[0].recipient = f.id(stranger);
    let err = f
        .server
        .receive_shares(&f.id(0), shares)
        .expect_err("stranger");
    assert!(matches!(err, SecAggError::Misaddressed { .. }), "{err}");
    assert_eq!(err.party(), Some("party-1"));
    // A sparse roster needs t > half of a neighbourhood, not of the roster.
    assert!(
        Server::new(ServerConfig {
            round: round_id(1),
            threshold: 2,
            clip: 1.0,
            vector_len: 10,
            neighbours: Neighbours::Harary(3),
        })
        .is_err()
    );
    let mut server = Server::new(ServerConfig {
        round: round_id(1),
        threshold: 2,
        clip: 1.0,
        vector_len: 10,
        neighbours: Neighbours::Harary(4),
    })
    .expect("server");
    for p in &f.parties {
        server.receive_advertisement(p.advertise()).expect("advert");
    }
    assert!(matches!(
        server.close_advertising(),
        Err(SecAggError::InvalidParams(_))
    ));
}
