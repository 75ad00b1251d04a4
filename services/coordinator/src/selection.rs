//! Who a round's selection drew for training, with the score each was drawn by, and what
//! became of each draw. It feeds the round record's `selected` list, the task results sent to
//! client-selector for the parties' reliability records, and the parties a model version's
//! lineage names. No I/O: `round_state.rs` keeps one per round and settles it as the round's
//! tickets end.
//!
//! Only the coordinator's own view counts: a task finished when its update was aggregated,
//! failed when its party said so (through client-selector), its update was refused or it was
//! given up on before the round's end, and timed out when the round ended without it.

/// At most this many draws are kept per round (a round offers `clients.per_round` tasks,
/// and again after failures; this bounds a misbehaving loop, not a real round).
const MAX_DRAWN: usize = 10_000;

/// What became of one draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The party refused the offer or did not answer it.
    Refused,
    /// Its task has not ended yet.
    Pending,
    /// Its update was aggregated.
    Finished,
    /// It failed, its update was refused, or it was given up on.
    Failed,
    /// The round ended without its update.
    TimedOut,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Refused => "refused",
            Outcome::Pending => "pending",
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
        }
    }
}

/// One party drawn for the round's training.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub party: String,
    /// Its score under the job's selection (see `OfferTasksResponse.selected`).
    pub score: f64,
    /// The task it accepted; None when it refused.
    pub task_id: Option<String>,
    pub outcome: Outcome,
}

/// Where a task's ticket stands when the draw is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketEnd {
    /// Its update was taken into the aggregate.
    Delivered,
    /// Its update was refused.
    Dropped,
    /// Nothing delivered (an upload may be in flight).
    Open,
}

/// The draws of one round's training.
#[derive(Debug, Default)]
pub struct RoundSelection {
    drawn: Vec<Drawn>,
}

impl RoundSelection {
    pub fn clear(&mut self) {
        self.drawn.clear();
    }

    /// A party drawn with `score`; `task_id` when it accepted.
    pub fn record(&mut self, party: String, score: f64, task_id: Option<String>) {
        if self.drawn.len() >= MAX_DRAWN {
            return;
        }
        let outcome = match task_id {
            Some(_) => Outcome::Pending,
            None => Outcome::Refused,
        };
        self.drawn.push(Drawn {
            party,
            score: if score.is_finite() { score } else { 0.0 },
            task_id,
            outcome,
        });
    }

    fn pending(&mut self, task_id: &str) -> Option<&mut Drawn> {
        self.drawn
            .iter_mut()
            .find(|d| d.outcome == Outcome::Pending && d.task_id.as_deref() == Some(task_id))
    }

    /// Its party said the task failed (or it left): settled as failed.
    pub fn failed(&mut self, task_id: &str) {
        if let Some(d) = self.pending(task_id) {
            d.outcome = Outcome::Failed;
        }
    }

    /// Settles the task from its ticket: before the round's end an open ticket was given up
    /// on (failed), at the end it timed out.
    pub fn settle(&mut self, task_id: &str, end: TicketEnd, round_over: bool) {
        if let Some(d) = self.pending(task_id) {
            d.outcome = match end {
                TicketEnd::Delivered => Outcome::Finished,
                TicketEnd::Dropped => Outcome::Failed,
                TicketEnd::Open if round_over => Outcome::TimedOut,
                TicketEnd::Open => Outcome::Failed,
            };
        }
    }

    pub fn drawn(&self) -> &[Drawn] {
        &self.drawn
    }

    /// The parties whose updates were aggregated, each once, in the order drawn.
    pub fn finished_parties(&self) -> Vec<String> {
        let mut parties: Vec<String> = Vec::new();
        for d in &self.drawn {
            if d.outcome == Outcome::Finished && !parties.contains(&d.party) {
                parties.push(d.party.clone());
            }
        }
        parties
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_settle_once_from_what_the_round_saw() {
        let mut s = RoundSelection::default();
        s.record("a".into(), 0.9, Some("t-a".into()));
        s.record("b".into(), 0.5, None);
        s.record("c".into(), 0.4, Some("t-c".into()));
        s.record("d".into(), f64::NAN, Some("t-d".into()));
        s.record("e".into(), 0.3, Some("t-e".into()));
        // c's party reported a failure; d was given up on before a re-offer.
        s.failed("t-c");
        s.settle("t-d", TicketEnd::Open, false);
        // The round ends: a delivered, e still open; c stays failed.
        s.settle("t-a", TicketEnd::Delivered, true);
        s.settle("t-c", TicketEnd::Delivered, true);
        s.settle("t-e", TicketEnd::Open, true);
        s.settle("unknown", TicketEnd::Delivered, true);
        let got: Vec<(&str, f64, Outcome)> = s
            .drawn()
            .iter()
            .map(|d| (d.party.as_str(), d.score, d.outcome))
            .collect();
        assert_eq!(
            got,
            [
                ("a", 0.9, Outcome::Finished),
                ("b", 0.5, Outcome::Refused),
                ("c", 0.4, Outcome::Failed),
                ("d", 0.0, Outcome::Failed),
                ("e", 0.3, Outcome::TimedOut),
            ]
        );
        assert_eq!(s.finished_parties(), ["a"]);
        s.clear();
        assert!(s.drawn().is_empty());
    }

    #[test]
    fn a_party_drawn_twice_is_listed_once_among_the_finished() {
        let mut s = RoundSelection::default();
        s.record("a".into(), 1.0, Some("t1".into()));
        s.record("b".into(), 1.0, Some("t2".into()));
        s.record("a".into(), 1.0, Some("t3".into()));
        s.settle("t1", TicketEnd::Delivered, true);
        s.settle("t2", TicketEnd::Dropped, true);
        s.settle("t3", TicketEnd::Delivered, true);
        assert_eq!(s.finished_parties(), ["a"]);
        assert_eq!(s.drawn()[1].outcome, Outcome::Failed);
    }
}
