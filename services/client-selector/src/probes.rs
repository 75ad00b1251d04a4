//! Connectivity probes (`cohort check --federation`): a `Probe` sent down every connected
//! party's session and its `ProbeReply` waited for, each party within one deadline. A
//! probe asks a party to show it could run a task now (task-manager starts its executor on a
//! toy task that reaches the server and reads the datasets; the answer says what it did,
//! relayed); nothing is offered, trained or aggregated, and the party's records do not change.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cohort_core::PartyId;
use cohort_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::registry::bounded_message;

/// A party's session, as the registry hands it out.
pub type SessionSender = mpsc::Sender<Result<pb::ServerMessage, Status>>;

/// The default and the longest wait for the answers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Probes sent and not answered yet: only the party a probe went to can answer it.
#[derive(Default)]
pub struct Probes {
    pending: Mutex<HashMap<String, (PartyId, oneshot::Sender<pb::ProbeReply>)>>,
}

impl Probes {
    /// Hands `reply` to the probe it answers, if `party` was sent that probe.
    pub fn answer(&self, party: &PartyId, reply: pb::ProbeReply) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let ours = pending
            .get(&reply.probe_id)
            .is_some_and(|(p, _)| p == party);
        if !ours {
            tracing::debug!(party = %party, "reply to an unknown probe");
            return;
        }
        if let Some((_, tx)) = pending.remove(&reply.probe_id) {
            let _ = tx.send(reply);
        }
    }

    fn forget(&self, probe_id: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(probe_id);
    }

    /// Probes every session in `sessions` at once; each waits at most `timeout`. Sorted by
    /// party.
    pub async fn probe_all(
        &self,
        sessions: Vec<(PartyId, SessionSender)>,
        timeout: Duration,
    ) -> Vec<pb::PartyProbe> {
        let probes = sessions
            .into_iter()
            .map(|(party, tx)| self.probe_one(party, tx, timeout));
        let mut out = futures::future::join_all(probes).await;
        out.sort_by(|a, b| a.party.cmp(&b.party));
        out
    }

    async fn probe_one(
        &self,
        party: PartyId,
        tx: SessionSender,
        timeout: Duration,
    ) -> pb::PartyProbe {
        let probe_id = cohort_core::random_token(12);
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(probe_id.clone(), (party.clone(), reply_tx));
        let started = Instant::now();
        let probe = pb::ServerMessage {
            kind: Some(pb::server_message::Kind::Probe(pb::Probe {
                probe_id: probe_id.clone(),
                timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            })),
        };
        // The send too: a party that does not read its stream fills its queue.
        let reply = tokio::time::timeout(timeout, async {
            tx.send(Ok(probe)).await.ok()?;
            reply_rx.await.ok()
        })
        .await;
        self.forget(&probe_id);
        let round_trip_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let mut out = pb::PartyProbe {
            party: party.to_string(),
            ..Default::default()
        };
        match reply {
            Ok(Some(r)) => {
                out.answered = true;
                out.ok = r.ok;
                out.round_trip_ms = round_trip_ms;
                out.message = bounded_message(&r.message).to_string();
                out.executor = r.executor.map(|mut e| {
                    e.error = bounded_message(&e.error).to_string();
                    e.server_saw_party = bounded_message(&e.server_saw_party).to_string();
                    e
                });
            }
            Ok(None) => out.message = "its session ended before it answered".into(),
            Err(_) => {
                out.message = format!(
                    "no answer within {timeout:?} (a task-manager older than the probe ignores it)"
                )
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn party(name: &str) -> PartyId {
        PartyId::parse(name).unwrap()
    }

    /// A party that answers every probe after `delay`, as `answerer` (itself or another).
    fn answering(
        probes: std::sync::Arc<Probes>,
        answerer: PartyId,
        delay: Duration,
    ) -> SessionSender {
        let (tx, mut rx) = mpsc::channel::<Result<pb::ServerMessage, Status>>(4);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.recv().await {
                if let Some(pb::server_message::Kind::Probe(p)) = msg.kind {
                    tokio::time::sleep(delay).await;
                    probes.answer(
                        &answerer,
                        pb::ProbeReply {
                            probe_id: p.probe_id,
                            ok: true,
                            message: "ready".into(),
                            executor: None,
                        },
                    );
                }
            }
        });
        tx
    }

    #[tokio::test]
    async fn every_party_is_reported_answered_or_not_and_only_its_own_reply_counts() {
        let probes = std::sync::Arc::new(Probes::default());
        let (silent_tx, _silent_rx) = mpsc::channel(4);
        let sessions = vec![
            (
                party("b"),
                answering(probes.clone(), party("b"), Duration::from_millis(30)),
            ),
            (party("c"), silent_tx),
            // d's probe is answered by someone else: that answer does not count.
            (
                party("d"),
                answering(probes.clone(), party("b"), Duration::ZERO),
            ),
        ];
        // The silent party holds the call for the whole timeout.
        let out = probes.probe_all(sessions, Duration::from_secs(1)).await;
        let names: Vec<_> = out.iter().map(|p| p.party.as_str()).collect();
        assert_eq!(names, ["b", "c", "d"]);
        assert!(out[0].answered && out[0].ok, "{:?}", out[0]);
        assert!(out[0].round_trip_ms >= 30, "{:?}", out[0]);
        assert!(!out[1].answered && out[1].message.contains("no answer"));
        assert!(!out[2].answered, "{:?}", out[2]);
        assert!(probes.pending.lock().unwrap().is_empty());
    }
}
