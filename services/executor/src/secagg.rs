//! The party's side of secure aggregation (`privacy.secure_aggregation`): after training,
//! the update is clipped to the job's L2 bound and sent masked through the coordinator's
//! `SecureAggregation` calls (`cohort_secagg::Party`): advertise fresh keys, wait for the
//! roster, send encrypted shares of both mask secrets to every other party, wait for the
//! shares addressed to this one, stream the masked update as "ring32" chunks (the
//! flattened model in its order, at global offsets), then answer the unmask request. Keys
//! and the self-mask seed come from the operating system's randomness and live only in
//! this task's memory; no key, share or seed is ever logged.
//!
//! Test-only switches (off by default, each announced with a warning):
//! `COHORT_SECAGG_EXIT_AT=before_masked_input|after_masked_input` makes the executor exit
//! at that point, as a party that drops out; `COHORT_SECAGG_TAP_DIR=DIR` writes the clipped
//! update this party masks (f32 little endian, `round-R-PARTY.f32`) to compare with what
//! the coordinator received.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use cohort_core::NamedTensor;
use cohort_core::spec::SecureAggregation;
use cohort_proto::v1 as pb;
use cohort_runtime::retry_unavailable;
use cohort_secagg::{
    CHUNK_ELEMENTS, EncryptedShare, Neighbours, Party, Roster, RosterEntry, RoundId, ShareDelivery,
    UnmaskRequest, clip_factor, key_from_bytes,
};
use rand::{Rng as _, SeedableRng as _};
use tonic::metadata::MetadataValue;

/// How long one call is retried while the route to the coordinator heals.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Where a test makes this party drop out (`COHORT_SECAGG_EXIT_AT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitAt {
    BeforeMaskedInput,
    AfterMaskedInput,
}

fn exit_at() -> Option<ExitAt> {
    match std::env::var("COHORT_SECAGG_EXIT_AT").ok()?.as_str() {
        "before_masked_input" => Some(ExitAt::BeforeMaskedInput),
        "after_masked_input" => Some(ExitAt::AfterMaskedInput),
        other => {
            tracing::warn!(
                value = other,
                "COHORT_SECAGG_EXIT_AT: not a point to exit at (before_masked_input, after_masked_input); ignored"
            );
            None
        }
    }
}

fn exit_here(at: ExitAt, want: Option<ExitAt>) {
    if want == Some(at) {
        tracing::warn!(point = ?at, "SECURE AGGREGATION TEST SWITCH (COHORT_SECAGG_EXIT_AT): this executor exits here, as a party that drops out");
        std::process::exit(3);
    }
}

struct Client {
    inner: pb::secure_aggregation_client::SecureAggregationClient<cohort_runtime::Channel>,
    job: MetadataValue<tonic::metadata::Ascii>,
    token: String,
    /// Epoch milliseconds the task must be done by.
    deadline_ms: i64,
}

impl Client {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert(cohort_proto::JOB_METADATA_KEY, self.job.clone());
        req.set_timeout(Duration::from_secs(120));
        req
    }

    fn wait(&self) -> pb::SecAggWaitRequest {
        pb::SecAggWaitRequest {
            task_token: self.token.clone(),
        }
    }

    fn past_deadline(&self) -> bool {
        cohort_runtime::now_ms() > self.deadline_ms
    }
}

/// Runs the protocol for this task's trained `update` (laid out like `global`).
pub(crate) async fn send_masked(
    channel: cohort_runtime::Channel,
    task: &pb::Task,
    settings: SecureAggregation,
    global: &[NamedTensor],
    update: Vec<NamedTensor>,
    train: pb::Metrics,
) -> anyhow::Result<()> {
    let exit = exit_at();
    let client = Client {
        inner: pb::secure_aggregation_client::SecureAggregationClient::new(channel)
            .max_decoding_message_size(cohort_fl::CHUNK_BYTES * 4)
            .max_encoding_message_size(cohort_fl::CHUNK_BYTES * 4),
        job: task.job_id.parse().context("task file: task.job_id")?,
        token: task.task_token.clone(),
        deadline_ms: task.deadline_ms,
    };
    let mut values = clipped(global, update, settings.clip)?;
    tap(task, &values)?;
    let round = RoundId::new(task.job_id.clone(), u64::from(task.round));
    let mut rng = rand::rngs::StdRng::try_from_os_rng()
        .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
    if settings.noise_std > 0.0 {
        // Distributed DP: this party's share of the central noise, after clipping.
        for x in &mut values {
            let z: f64 = rng.sample(rand_distr::StandardNormal);
            *x = (f64::from(*x) + settings.noise_std * z) as f32;
        }
        tracing::info!(task = %task.task_id, noise_std = settings.noise_std, "secure aggregation: this party's share of the DP noise added");
    }
    let mut party = Party::new(
        round.clone(),
        task.party.clone(),
        settings.range(),
        &mut rng,
    )
    .context("secure aggregation")?;

    let ad = party.advertise();
    let advert = pb::SecAggAdvertiseRequest {
        task_token: client.token.clone(),
        c_pk: Bytes::copy_from_slice(&ad.c_pk),
        s_pk: Bytes::copy_from_slice(&ad.s_pk),
        b_commitment: Bytes::copy_from_slice(&ad.b_commitment),
    };
    retry_unavailable("secure aggregation: advertise", RETRY_FOR, || {
        let mut c = client.inner.clone();
        let req = client.request(advert.clone());
        async move { c.advertise(req).await }
    })
    .await
    .context("secure aggregation: the keys were refused")?;

    let roster = poll(&client, "the roster", |mut c, req| async move {
        let r = c.get_roster(req).await?.into_inner();
        Ok((!r.waiting).then_some(r))
    })
    .await?;
    let roster = roster_of(&round, roster)?;
    tracing::info!(task = %task.task_id, parties = roster.len(), threshold = roster.threshold, neighbours = roster.neighbours.degree(), "secure aggregation: roster received");
    let shares = party
        .share_keys(&roster, &mut rng)
        .context("secure aggregation: the roster")?;
    let shares = pb::SecAggShareKeysRequest {
        task_token: client.token.clone(),
        shares: shares
            .into_iter()
            .map(|s| pb::SecAggShare {
                sender: s.sender,
                recipient: s.recipient,
                ciphertext: s.ciphertext.into(),
            })
            .collect(),
    };
    retry_unavailable("secure aggregation: share keys", RETRY_FOR, || {
        let mut c = client.inner.clone();
        let req = client.request(shares.clone());
        async move { c.share_keys(req).await }
    })
    .await
    .context("secure aggregation: the shares were refused")?;

    let delivered = poll(
        &client,
        "the other parties' shares",
        |mut c, req| async move {
            let r = c.get_shares(req).await?.into_inner();
            Ok((!r.waiting).then_some(r))
        },
    )
    .await?;
    let delivery = ShareDelivery {
        round: round.clone(),
        recipient: task.party.clone(),
        sharers: delivered.sharers,
        shares: delivered
            .shares
            .into_iter()
            .map(|s| EncryptedShare {
                round: round.clone(),
                sender: s.sender,
                recipient: s.recipient,
                ciphertext: s.ciphertext.to_vec(),
            })
            .collect(),
    };
    party
        .receive_shares(&delivery)
        .context("secure aggregation: the shares delivered")?;
    tracing::info!(task = %task.task_id, sharers = delivery.sharers.len(), "secure aggregation: shares received");
    exit_here(ExitAt::BeforeMaskedInput, exit);

    // Masked once, sent as often as the call is retried.
    let mut chunks = Vec::with_capacity(values.len().div_ceil(CHUNK_ELEMENTS));
    let mut ring = vec![0u32; CHUNK_ELEMENTS];
    let mut clamped = 0;
    for (i, piece) in values.chunks(CHUNK_ELEMENTS).enumerate() {
        let offset = (i * CHUNK_ELEMENTS) as u64;
        let out = &mut ring[..piece.len()];
        clamped += party
            .mask_into(offset, piece, out)
            .context("secure aggregation: masking")?;
        let data: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        chunks.push(pb::TensorChunk {
            tensor: String::new(),
            dtype: "ring32".into(),
            shape: Vec::new(),
            offset,
            data: data.into(),
        });
    }
    drop(values);
    if clamped > 0 {
        tracing::warn!(task = %task.task_id, clamped, "secure aggregation: values outside [-clip, clip] were clamped");
    }
    let header = pb::SubmitUpdateRequest {
        part: Some(pb::submit_update_request::Part::Header(pb::UpdateHeader {
            task_token: client.token.clone(),
            samples: train.samples,
            train: Some(train),
        })),
    };
    retry_unavailable("secure aggregation: masked update", RETRY_FOR, || {
        let mut c = client.inner.clone();
        let messages =
            std::iter::once(header.clone()).chain(chunks.clone().into_iter().map(|chunk| {
                pb::SubmitUpdateRequest {
                    part: Some(pb::submit_update_request::Part::Chunk(chunk)),
                }
            }));
        let req = client.request(futures::stream::iter(messages));
        async move { c.submit_masked(req).await }
    })
    .await
    .context("secure aggregation: the masked update was refused")?;
    drop(chunks);
    tracing::info!(task = %task.task_id, "secure aggregation: masked update sent");
    exit_here(ExitAt::AfterMaskedInput, exit);

    let asked = poll(&client, "the unmask request", |mut c, req| async move {
        let r = c.get_unmask_request(req).await?.into_inner();
        Ok((!r.waiting).then_some(r))
    })
    .await?;
    let request = UnmaskRequest {
        round: round.clone(),
        dropped: asked.dropped,
        survivors: asked.survivors,
    };
    let response = party
        .unmask(&request)
        .context("secure aggregation: the unmask request")?;
    let answer = pb::SecAggUnmaskResponse {
        task_token: client.token.clone(),
        mask_key_shares: response
            .mask_key_shares
            .into_iter()
            .map(|s| pb::SecAggRevealedShare {
                owner: s.owner,
                share: s.share.into(),
            })
            .collect(),
        self_mask_shares: response
            .self_mask_shares
            .into_iter()
            .map(|s| pb::SecAggRevealedShare {
                owner: s.owner,
                share: s.share.into(),
            })
            .collect(),
    };
    retry_unavailable("secure aggregation: unmask", RETRY_FOR, || {
        let mut c = client.inner.clone();
        let req = client.request(answer.clone());
        async move { c.unmask(req).await }
    })
    .await
    .context("secure aggregation: the unmask shares were refused")?;
    tracing::info!(
        task = %task.task_id, dropped = request.dropped.len(), survivors = request.survivors.len(),
        "secure aggregation: unmask request answered"
    );
    Ok(())
}

type Call<T> = tonic::Request<T>;

/// Asks a waiting call until it answers something (it says `waiting` while the coordinator
/// has nothing yet), within the task's deadline.
async fn poll<T, F, Fut>(client: &Client, what: &str, call: F) -> anyhow::Result<T>
where
    F: Fn(
        pb::secure_aggregation_client::SecureAggregationClient<cohort_runtime::Channel>,
        Call<pb::SecAggWaitRequest>,
    ) -> Fut,
    Fut: Future<Output = Result<Option<T>, tonic::Status>>,
{
    loop {
        let got = retry_unavailable("secure aggregation: wait", RETRY_FOR, || {
            call(client.inner.clone(), client.request(client.wait()))
        })
        .await
        .with_context(|| format!("secure aggregation: waiting for {what}"))?;
        if let Some(found) = got {
            return Ok(found);
        }
        if client.past_deadline() {
            bail!("secure aggregation: the task's deadline passed waiting for {what}");
        }
    }
}

/// The roster as the coordinator sent it, for this party to check.
fn roster_of(round: &RoundId, r: pb::SecAggRoster) -> anyhow::Result<Roster> {
    let parties = r
        .parties
        .into_iter()
        .map(|e| {
            Ok(RosterEntry {
                c_pk: key_from_bytes(&e.party, "c_pk", &e.c_pk)?,
                s_pk: key_from_bytes(&e.party, "s_pk", &e.s_pk)?,
                party: e.party,
            })
        })
        .collect::<Result<Vec<_>, cohort_secagg::SecAggError>>()
        .context("secure aggregation: the roster")?;
    Ok(Roster {
        round: round.clone(),
        threshold: r.threshold as usize,
        clip: r.clip,
        neighbours: Neighbours::from_degree(r.neighbours as usize),
        parties,
    })
}

/// The update flattened in the model's order and clipped to L2 norm `clip`.
fn clipped(
    global: &[NamedTensor],
    update: Vec<NamedTensor>,
    clip: f32,
) -> anyhow::Result<Vec<f32>> {
    let mut values = Vec::with_capacity(global.iter().map(|t| t.data.len()).sum());
    for g in global {
        let u = update
            .iter()
            .find(|u| u.name == g.name)
            .with_context(|| format!("secure aggregation: the update has no tensor {}", g.name))?;
        if u.data.len() != g.data.len() {
            bail!(
                "secure aggregation: tensor {} has {} values, the model {}",
                g.name,
                u.data.len(),
                g.data.len()
            );
        }
        values.extend_from_slice(&u.data);
    }
    let norm = values
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() {
        bail!("secure aggregation: the update is not finite");
    }
    let factor = clip_factor(norm, clip);
    if factor < 1.0 {
        for x in &mut values {
            *x = (f64::from(*x) * factor) as f32;
        }
    }
    tracing::info!(
        norm,
        clip,
        clipped = factor < 1.0,
        "secure aggregation: update clipped to the bound"
    );
    Ok(values)
}

/// Tests only: the clipped update this party masks, to compare with what the coordinator
/// received.
fn tap(task: &pb::Task, values: &[f32]) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("COHORT_SECAGG_TAP_DIR") else {
        return Ok(());
    };
    let path = std::path::Path::new(&dir).join(format!("round-{}-{}.f32", task.round, task.party));
    tracing::warn!(path = %path.display(), "SECURE AGGREGATION TAP (COHORT_SECAGG_TAP_DIR): this party's clipped update is written in the clear; for tests only");
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&path, bytes)
        .with_context(|| format!("COHORT_SECAGG_TAP_DIR: {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tensor(name: &str, data: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![data.len()],
            data,
        }
    }

    #[test]
    fn the_update_is_flattened_in_the_models_order_and_clipped() {
        let global = vec![tensor("a", vec![0.0; 2]), tensor("b", vec![0.0; 1])];
        // Sent in another order, norm 5: scaled to the clip 1.
        let update = vec![tensor("b", vec![4.0]), tensor("a", vec![3.0, 0.0])];
        let values = clipped(&global, update, 1.0).unwrap();
        assert_eq!(values.len(), 3);
        assert!((values[0] - 0.6).abs() < 1e-6 && (values[2] - 0.8).abs() < 1e-6);
        let short = vec![tensor("a", vec![1.0]), tensor("b", vec![1.0])];
        assert!(clipped(&global, short, 1.0).is_err());
        let inside = vec![tensor("a", vec![0.1, 0.2]), tensor("b", vec![0.2])];
        assert_eq!(clipped(&global, inside, 1.0).unwrap(), vec![0.1, 0.2, 0.2]);
    }

    #[test]
    fn the_spec_splits_the_noise_as_the_dp_mechanism_does() {
        let spec = cohort_core::JobSpec::parse(
            "name: j\nmodel: {arch: mlp, hidden: [8]}\ndata: {dataset: digits}\n\
             clients: {per_round: 5, min: 4}\n\
             privacy: {secure_aggregation: true, dp: {clip: 0.7, noise_multiplier: 1.3, delta: 1e-5}}\n",
        )
        .unwrap();
        let settings = spec.secure_aggregation().unwrap();
        let dp = spec.privacy.dp.as_ref().unwrap();
        let want = cohort_fl::privacy::distributed_noise_std(dp, spec.clients.min);
        assert!(
            (settings.noise_std - want).abs() < 1e-12,
            "{settings:?} vs {want}"
        );
        assert_eq!(settings.denominator, Some(5));
        assert_eq!(settings.clip, 0.7);
    }
}
