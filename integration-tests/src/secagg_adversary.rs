//! A hostile party under secure aggregation (`UpdateKind::SecAggCheat`): with a real
//! certificate and its own task token it speaks `SecureAggregation` directly. In its first
//! round it advertises fresh keys, waits for the roster and sends its key shares in another
//! party's name; in every later round it advertises its first round's keys again. Each
//! call's refusal ends its task with that refusal.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use cohort_proto::v1 as pb;
use cohort_runtime::Channel;
use rand::SeedableRng as _;

use crate::adversary::for_job;

/// The keys of its first round: (c_pk, s_pk, commitment).
static FIRST_KEYS: Mutex<Option<(Bytes, Bytes, Bytes)>> = Mutex::new(None);

type Refusal = (tonic::Code, String);

fn refusal(s: tonic::Status) -> Refusal {
    (s.code(), s.message().to_string())
}

pub async fn cheat(channel: &Channel, task: &pb::Task) -> Result<(), Refusal> {
    let mut sa = pb::secure_aggregation_client::SecureAggregationClient::new(channel.clone());
    let kept = FIRST_KEYS.lock().map(|k| k.clone()).unwrap_or(None);
    let (c_pk, s_pk, commitment) = match kept {
        Some(keys) => keys,
        None => {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let round = cohort_secagg::RoundId::new(task.job_id.clone(), u64::from(task.round));
            let party = cohort_secagg::Party::new(round, task.party.clone(), 1.0, &mut rng)
                .map_err(|e| (tonic::Code::Internal, e.to_string()))?;
            let ad = party.advertise();
            let keys = (
                Bytes::copy_from_slice(&ad.c_pk),
                Bytes::copy_from_slice(&ad.s_pk),
                Bytes::copy_from_slice(&ad.b_commitment),
            );
            if let Ok(mut k) = FIRST_KEYS.lock() {
                *k = Some(keys.clone());
            }
            keys
        }
    };
    sa.advertise(for_job(
        &task.job_id,
        pb::SecAggAdvertiseRequest {
            task_token: task.task_token.clone(),
            c_pk,
            s_pk,
            b_commitment: commitment,
        },
    ))
    .await
    .map_err(refusal)?;
    let roster = loop {
        let r = sa
            .get_roster(for_job(
                &task.job_id,
                pb::SecAggWaitRequest {
                    task_token: task.task_token.clone(),
                },
            ))
            .await
            .map_err(refusal)?
            .into_inner();
        if !r.waiting {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // One share for every other party, as many as the roster needs, all claiming to come
    // from another party.
    let others: Vec<&pb::SecAggRosterEntry> = roster
        .parties
        .iter()
        .filter(|e| e.party != task.party)
        .collect();
    let victim = others.first().map(|e| e.party.clone()).unwrap_or_default();
    let shares = others
        .iter()
        .map(|e| pb::SecAggShare {
            sender: victim.clone(),
            recipient: e.party.clone(),
            ciphertext: vec![0u8; cohort_secagg::ENCRYPTED_SHARE_LEN].into(),
        })
        .collect();
    sa.share_keys(for_job(
        &task.job_id,
        pb::SecAggShareKeysRequest {
            task_token: task.task_token.clone(),
            shares,
        },
    ))
    .await
    .map_err(refusal)?;
    Ok(())
}
