//! Continuous batching: the steps of concurrent requests on one shard run together as one
//! forward pass, so each weight is read once for all of them. Requests join and leave at any
//! step; a long prompt runs in chunks between the other requests' decode steps.
//!
//! Calls queue their steps to one worker thread. Each round the worker takes every waiting
//! decode step (up to `max_batch`) and adds prompt chunks, first come first served, within a
//! budget of `prefill_chunk` positions (a sixteenth of it when decode steps share the round),
//! then answers the steps that are complete.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::cache::{CacheStore, RequestCache};
use super::model::{BatchStep, ShardModel};
use crate::error::{Error, Result};

/// How the worker groups steps.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Most prompt positions one round runs (a longer prompt runs in chunks of about this, or
    /// of a sixteenth of it while other requests decode).
    pub prefill_chunk: usize,
    /// Most requests' steps one round runs.
    pub max_batch: usize,
}

/// Environment variables that set [`BatchOptions`] (the CLI's `--prefill-chunk` and
/// `--max-batch` set them).
pub const PREFILL_CHUNK_ENV: &str = "EXO_PREFILL_CHUNK";
pub const MAX_BATCH_ENV: &str = "EXO_MAX_BATCH";

impl Default for BatchOptions {
    fn default() -> Self {
        Self { prefill_chunk: 256, max_batch: 64 }
    }
}

impl BatchOptions {
    /// The defaults, with `prefill_chunk` and `max_batch` where given, else where the
    /// environment sets them.
    pub fn new(prefill_chunk: Option<usize>, max_batch: Option<usize>) -> Result<Self> {
        let defaults = Self::default();
        let prefill_chunk = match prefill_chunk {
            Some(value) => value,
            None => count_from_env(PREFILL_CHUNK_ENV)?.unwrap_or(defaults.prefill_chunk),
        };
        let max_batch = match max_batch {
            Some(value) => value,
            None => count_from_env(MAX_BATCH_ENV)?.unwrap_or(defaults.max_batch),
        };
        if prefill_chunk == 0 || max_batch == 0 {
            return Err(Error::InvalidArgument(format!(
                "the prefill chunk ({prefill_chunk}) and the batch size ({max_batch}) must be at least 1"
            )));
        }
        Ok(Self { prefill_chunk, max_batch })
    }
}

/// The positive count the environment variable `name` holds, if set.
fn count_from_env(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::InvalidArgument(format!("{name}={text:?} is not a count"))),
        Err(_) => Ok(None),
    }
}

/// A queued step: the request's hidden states still to run, and where its result goes.
struct Job {
    model: Arc<ShardModel>,
    request_id: String,
    /// `[batch, seq, hidden]`; positions before `done` have run.
    hidden: Tensor,
    done: usize,
    /// Hidden states of the chunks run so far (not kept on the last shard).
    outputs: Vec<Tensor>,
    cache: RequestCache,
    store: Arc<Mutex<CacheStore>>,
    reply: oneshot::Sender<Result<Tensor>>,
}

impl Job {
    fn seq(&self) -> usize {
        self.hidden.dim(1).unwrap_or(0)
    }

    fn remaining(&self) -> usize {
        self.seq() - self.done
    }

    /// Checks the cache back in (emptied if the step failed: it may be half-updated) and
    /// answers the caller.
    fn finish(self, result: Result<Tensor>) {
        let cache = if result.is_ok() { self.cache } else { RequestCache::default() };
        self.store.lock().expect("cache lock poisoned").check_in(&self.request_id, cache);
        // The caller may have gone (its request was cancelled); the cache is back either way.
        let _ = self.reply.send(result);
    }
}

/// The handle calls queue their steps through; the worker stops when it is dropped.
pub struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the worker thread.
    pub fn start(options: BatchOptions) -> Self {
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("exo-batcher".into())
            .spawn(move || work(receiver, options))
            .expect("the batching thread starts");
        Self { queue: sender }
    }

    /// Runs `hidden` (`[batch, seq, hidden]`, checked to fit the context) through `model`
    /// for `request_id`, whose `cache` was checked out of `store`; the cache goes back to the
    /// store when the step ends.
    pub async fn run(
        &self,
        model: Arc<ShardModel>,
        request_id: &str,
        hidden: Tensor,
        cache: RequestCache,
        store: Arc<Mutex<CacheStore>>,
    ) -> Result<Tensor> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            model,
            request_id: request_id.to_string(),
            hidden,
            done: 0,
            outputs: Vec::new(),
            cache,
            store,
            reply,
        };
        let queued = self.queue.send(job);
        if let Err(mpsc::SendError(job)) = queued {
            let error = Error::InvalidArgument("the engine's batching thread has stopped".into());
            job.finish(Err(error.duplicate()));
            return Err(error);
        }
        answer
            .await
            .map_err(|_| Error::InvalidArgument(format!("request {request_id}'s step was dropped")))?
    }
}

/// How long a round waits for more steps after the last one arrived (at least), while the
/// requests the last two rounds answered have not all queued their next. Their callers sample
/// and send them back one after another (about half a millisecond each for a large
/// vocabulary, more while the API starts new streams), and a round started on the first of
/// them would leave the rest for a round of their own, which costs nearly a whole pass over
/// the weights (two rounds, so that requests that fell out of step come back into one).
const GATHER: Duration = Duration::from_millis(3);

/// The quiet wait grows to this fraction of the last round's time.
const QUIET_SHARE: u32 = 32;

/// The whole wait stops after this many quiet waits: stragglers slower still (a step that went
/// round a ring of nodes, a request that ended) are not waited for.
const MAX_QUIET_WAITS: u32 = 4;

/// The worker: rounds of batched steps until every handle is gone.
fn work(receiver: mpsc::Receiver<Job>, options: BatchOptions) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    // The requests answered by the last round and the one before.
    let mut answered: [HashSet<String>; 2] = Default::default();
    // How long the last round ran.
    let mut last_round = Duration::ZERO;
    loop {
        if waiting.is_empty() {
            match receiver.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        // The answered requests whose next step has not arrived (queued prompts do not count).
        let mut expected: HashSet<&String> = answered[0].union(&answered[1]).collect();
        for job in &waiting {
            expected.remove(&job.request_id);
        }
        let quiet = GATHER.max(last_round / QUIET_SHARE);
        let limit = Instant::now() + quiet * MAX_QUIET_WAITS;
        let mut quiet_until = Instant::now() + quiet;
        while !expected.is_empty() {
            let left = quiet_until.min(limit).saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(job) => {
                    expected.remove(&job.request_id);
                    waiting.push_back(job);
                    quiet_until = Instant::now() + quiet;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        waiting.extend(receiver.try_iter());
        // Steps whose callers went away are not run.
        let (gone, live): (Vec<Job>, Vec<Job>) = waiting.drain(..).partition(|job| job.reply.is_closed());
        waiting.extend(live);
        for job in gone {
            let cache = job.cache;
            job.store.lock().expect("cache lock poisoned").check_in(&job.request_id, cache);
        }
        let round = take_round(&mut waiting, options);
        if round.is_empty() {
            continue;
        }
        let mut ids: HashSet<String> = round.iter().map(|(job, _)| job.request_id.clone()).collect();
        let started = Instant::now();
        let unfinished = run_round(round);
        last_round = started.elapsed();
        for job in &unfinished {
            ids.remove(&job.request_id);
        }
        answered = [ids, std::mem::take(&mut answered[0])];
        // Unfinished prompts go back to the front, in their order.
        for job in unfinished.into_iter().rev() {
            waiting.push_front(job);
        }
    }
}

/// Takes one round's steps off `waiting`, with the positions each runs: every decode step of
/// the first step's model (up to `max_batch`), then prompt chunks within the token budget.
fn take_round(waiting: &mut VecDeque<Job>, options: BatchOptions) -> Vec<(Job, usize)> {
    let Some(model) = waiting.front().map(|job| job.model.clone()) else { return Vec::new() };
    let same_model = |job: &Job| Arc::ptr_eq(&job.model, &model);
    let decodes = waiting.iter().filter(|job| same_model(job) && job.remaining() == 1).count();
    let decodes = decodes.min(options.max_batch);
    // Beside decoding requests a prompt runs in smaller chunks, so that their next tokens are
    // not held up long (on a CPU each row costs about as much as a decode step's); alone it
    // takes the whole chunk.
    let mut budget = if decodes == 0 { options.prefill_chunk } else { (options.prefill_chunk / 16).max(1) };
    let mut slots = options.max_batch;
    let mut round = Vec::new();
    let mut rest = VecDeque::with_capacity(waiting.len());
    for job in waiting.drain(..) {
        let remaining = job.remaining();
        let take = if !same_model(&job) || slots == 0 {
            0
        } else if remaining == 1 {
            1
        } else {
            let take = remaining.min(budget);
            budget -= take;
            take
        };
        if take == 0 {
            rest.push_back(job);
        } else {
            slots -= 1;
            round.push((job, take));
        }
    }
    *waiting = rest;
    round
}

/// Runs one round and answers its complete steps; returns the steps with positions left.
fn run_round(round: Vec<(Job, usize)>) -> Vec<Job> {
    let model = round[0].0.model.clone();
    let chunks = round
        .iter()
        .map(|(job, take)| Ok(job.hidden.narrow(1, job.done, *take)?))
        .collect::<Result<Vec<_>>>();
    let (mut jobs, takes): (Vec<Job>, Vec<usize>) = round.into_iter().unzip();
    let outputs = chunks.and_then(|chunks| {
        let steps = jobs
            .iter_mut()
            .zip(chunks)
            .zip(&takes)
            .map(|((job, hidden), take)| {
                job.cache.step_end = job.cache.position + job.seq() - job.done;
                (job, hidden, take)
            })
            .map(|(job, hidden, take)| BatchStep {
                wants_logits: job.done + take == job.seq(),
                hidden,
                cache: &mut job.cache,
            })
            .collect();
        // A panic inside the pass fails its steps, not the worker (and every later request).
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward_batch(steps))).unwrap_or_else(
            |panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or(panic.downcast_ref::<&str>().copied());
                Err(Error::InvalidArgument(format!("the batched step failed: {}", what.unwrap_or("a panic"))))
            },
        )
    });
    let outputs = match outputs {
        Ok(outputs) => outputs,
        Err(error) => {
            // A failure of the pass itself (inputs were checked when queued) fails its steps.
            for job in jobs {
                job.finish(Err(error.duplicate()));
            }
            return Vec::new();
        }
    };
    let mut unfinished = Vec::new();
    for ((mut job, take), output) in jobs.into_iter().zip(takes).zip(outputs) {
        job.done += take;
        let complete = job.done == job.seq();
        match (output, complete) {
            (Some(output), true) if job.outputs.is_empty() => job.finish(Ok(output)),
            (Some(output), true) => {
                job.outputs.push(output);
                let joined = Tensor::cat(&job.outputs, 1).map_err(Error::from);
                job.finish(joined);
            }
            // A prompt's chunk: its hidden states are kept (the last shard keeps none).
            (Some(output), false) => {
                job.outputs.push(output);
                unfinished.push(job);
            }
            (None, false) => unfinished.push(job),
            (None, true) => job.finish(Err(Error::InvalidArgument("a finished step gave no output".into()))),
        }
    }
    unfinished
}
