//! Who masks with whom: SecAgg+'s sparse graph (Bell et al., CCS 2020), or SecAgg's complete
//! graph.
//!
//! Under [`Neighbours::Harary`]`(k)` the round's parties sit on a ring in an order drawn from
//! their advertised keys (SHA-256 of the round, the party and its `s_pk`: fresh every round,
//! chosen by neither the server nor one party alone), and each party is joined to the k/2
//! nearest on either side: the Harary graph H(k, n), k-connected, so it stays connected with
//! up to k − 1 parties gone. A party shares its secrets only with its neighbours and masks only
//! with them, so its work grows with k instead of n, and the threshold t is counted within a
//! closed neighbourhood (the party and its k neighbours: [`Graph::holders`]).
//!
//! Unmasking reveals the sum of every connected group of survivors, not only of all of them:
//! pairwise masks cancel inside each group. So the survivors' subgraph must be connected
//! ([`Graph::connected`]); both the server and every party check it before unmasking.

use crate::crypto::ring_key;
use crate::messages::Roster;

/// The graph a round's parties mask over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Neighbours {
    /// Every party with every other (SecAgg); for small cohorts.
    #[default]
    Complete,
    /// Each party with its k nearest on the ring (k even, ≥ 2); complete when k ≥ n − 1.
    Harary(usize),
}

impl Neighbours {
    /// From the wire: 0 is the complete graph.
    pub fn from_degree(k: usize) -> Neighbours {
        if k == 0 {
            Neighbours::Complete
        } else {
            Neighbours::Harary(k)
        }
    }

    /// For the wire: 0 is the complete graph.
    pub fn degree(self) -> usize {
        match self {
            Neighbours::Complete => 0,
            Neighbours::Harary(k) => k,
        }
    }

    /// k must be even and at least 2 (k/2 on either side of the ring).
    pub fn check(self) -> Result<(), String> {
        match self {
            Neighbours::Harary(k) if k < 2 || k % 2 != 0 => Err(format!(
                "{k} neighbours: need an even number of at least 2 (half on either side of the ring)"
            )),
            _ => Ok(()),
        }
    }

    /// Parties holding shares of one party's secrets (it and its neighbours) in a round of
    /// `parties`.
    pub fn holders(self, parties: usize) -> usize {
        match self {
            Neighbours::Harary(k) if k < parties.saturating_sub(1) => k + 1,
            _ => parties,
        }
    }
}

/// The round's graph over roster positions (0-based, the roster's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// Neighbours on either side of the ring; `None`: complete.
    half: Option<usize>,
    /// Roster position → place on the ring.
    place: Vec<usize>,
    /// Place on the ring → roster position.
    ring: Vec<usize>,
}

impl Graph {
    /// The graph of a (validated) roster.
    pub fn of(roster: &Roster) -> Graph {
        let n = roster.len();
        let half = match roster.neighbours {
            Neighbours::Harary(k) if k < n.saturating_sub(1) => Some(k / 2),
            _ => None,
        };
        let mut ring: Vec<usize> = (0..n).collect();
        if half.is_some() {
            ring.sort_by_cached_key(|&p| {
                let e = &roster.parties[p];
                ring_key(&roster.round, &e.party, &e.s_pk)
            });
        }
        let mut place = vec![0; n];
        for (r, &p) in ring.iter().enumerate() {
            place[p] = r;
        }
        Graph { half, place, ring }
    }

    /// Roster positions in ring order (the roster's order for the complete graph).
    pub fn ring(&self) -> &[usize] {
        &self.ring
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    pub fn is_complete(&self) -> bool {
        self.half.is_none()
    }

    /// Parties holding shares of one party's secrets: it and its neighbours.
    pub fn holders(&self) -> usize {
        self.half.map_or(self.len(), |h| 2 * h + 1)
    }

    /// Whether a and b mask with each other (a party is not its own neighbour).
    pub fn adjacent(&self, a: usize, b: usize) -> bool {
        if a == b || a >= self.len() || b >= self.len() {
            return false;
        }
        match self.half {
            None => true,
            Some(h) => {
                let n = self.len();
                let d = (self.place[a] + n - self.place[b]) % n;
                d.min(n - d) <= h
            }
        }
    }

    /// Whether `b` holds shares of `a`'s secrets: a neighbour, or `a` itself.
    pub fn holds(&self, holder: usize, owner: usize) -> bool {
        (holder == owner && owner < self.len()) || self.adjacent(holder, owner)
    }

    /// The roster positions of `p`'s neighbours, in roster order.
    pub fn neighbours(&self, p: usize) -> Vec<usize> {
        let n = self.len();
        if p >= n {
            return Vec::new();
        }
        let mut out: Vec<usize> = match self.half {
            None => (0..n).filter(|&q| q != p).collect(),
            Some(h) => (1..=h)
                .flat_map(|d| [(self.place[p] + d) % n, (self.place[p] + n - d) % n])
                .map(|r| self.ring[r])
                .collect(),
        };
        out.sort_unstable();
        out
    }

    /// Whether the subgraph induced by `members` (roster positions) is connected. An empty
    /// set is not.
    pub fn connected(&self, members: &[usize]) -> bool {
        let n = self.len();
        let mut inside = vec![false; n];
        for &m in members {
            if m < n {
                inside[m] = true;
            }
        }
        let Some(&start) = members.iter().find(|&&m| m < n) else {
            return false;
        };
        if self.half.is_none() {
            return members.iter().all(|&m| m < n);
        }
        let mut seen = vec![false; n];
        seen[start] = true;
        let mut stack = vec![start];
        let mut reached = 1;
        while let Some(p) = stack.pop() {
            for q in self.neighbours(p) {
                if inside[q] && !seen[q] {
                    seen[q] = true;
                    reached += 1;
                    stack.push(q);
                }
            }
        }
        reached == inside.iter().filter(|&&i| i).count() && members.iter().all(|&m| m < n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{RosterEntry, RoundId};

    fn roster(n: usize, neighbours: Neighbours) -> Roster {
        Roster {
            round: RoundId::new("j", 3),
            threshold: 2,
            clip: 1.0,
            neighbours,
            parties: (0..n)
                .map(|i| RosterEntry {
                    party: format!("p{i:03}"),
                    c_pk: [i as u8; 32],
                    s_pk: [(i as u8).wrapping_add(128); 32],
                })
                .collect(),
        }
    }

    #[test]
    fn a_harary_graph_gives_every_party_k_neighbours_symmetrically() {
        let g = Graph::of(&roster(20, Neighbours::Harary(6)));
        assert!(!g.is_complete());
        assert_eq!(g.holders(), 7);
        for p in 0..20 {
            let ns = g.neighbours(p);
            assert_eq!(ns.len(), 6, "party {p}: {ns:?}");
            for q in ns {
                assert!(g.adjacent(q, p) && g.adjacent(p, q));
                assert!(g.holds(q, p));
            }
            assert!(!g.adjacent(p, p) && g.holds(p, p));
        }
        let edges: usize = (0..20).map(|p| g.neighbours(p).len()).sum();
        assert_eq!(edges, 20 * 6);
    }

    #[test]
    fn the_ring_order_comes_from_the_keys_not_the_names() {
        let g = Graph::of(&roster(20, Neighbours::Harary(2)));
        // Sorted names would make p000 and p001 neighbours; the key-drawn order almost
        // never keeps all 19 such pairs (a fixed seed: it does not here).
        let kept = (0..19).filter(|&p| g.adjacent(p, p + 1)).count();
        assert!(kept < 19, "ring order equals the name order");
        let mut later = roster(20, Neighbours::Harary(2));
        later.round.round += 1;
        assert_ne!(Graph::of(&later), g, "the same ring two rounds running");
    }

    #[test]
    fn few_parties_or_a_large_k_make_the_complete_graph() {
        for (n, k) in [(5, 4), (5, 8), (9, 8)] {
            let g = Graph::of(&roster(n, Neighbours::Harary(k)));
            assert!(g.is_complete(), "n={n} k={k}");
            assert_eq!(g.holders(), n);
            assert_eq!(Neighbours::Harary(k).holders(n), n);
        }
        assert_eq!(Neighbours::Harary(4).holders(20), 5);
        assert_eq!(Neighbours::Complete.holders(20), 20);
        let g = Graph::of(&roster(5, Neighbours::Complete));
        assert_eq!(g.neighbours(2), vec![0, 1, 3, 4]);
    }

    #[test]
    fn odd_or_tiny_degrees_are_refused() {
        assert!(Neighbours::Harary(3).check().is_err());
        assert!(Neighbours::Harary(0).check().is_err());
        assert!(Neighbours::Harary(4).check().is_ok());
        assert!(Neighbours::Complete.check().is_ok());
        assert_eq!(Neighbours::from_degree(0), Neighbours::Complete);
        assert_eq!(Neighbours::from_degree(6).degree(), 6);
    }

    #[test]
    fn connectivity_of_survivors_is_judged_on_the_induced_subgraph() {
        let g = Graph::of(&roster(12, Neighbours::Harary(2)));
        let all: Vec<usize> = (0..12).collect();
        assert!(g.connected(&all));
        // A cycle minus one party is a path: still connected. Minus two apart: two groups.
        let ring_at = |r: usize| g.ring[r];
        let minus_one: Vec<usize> = (1..12).map(ring_at).collect();
        assert!(g.connected(&minus_one));
        let minus_two: Vec<usize> = (0..12).filter(|&r| r != 0 && r != 6).map(ring_at).collect();
        assert!(!g.connected(&minus_two));
        assert!(!g.connected(&[]));
        let complete = Graph::of(&roster(12, Neighbours::Complete));
        assert!(complete.connected(&[3, 9]));
    }
}
