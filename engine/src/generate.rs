//! Slots (a KV cache plus the ids it was computed from), syncing a slot to a new prompt, sampling,
//! and the generation loop with its stop rules, deadline and cancellation checks.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cache::KvCache;
use crate::error::Result;
use crate::model::PhiModel;
use crate::tokenizer::TextStream;
use crate::weights::Engine;

/// Prefill runs in chunks of this many positions; a cancel is seen before each layer of a chunk
/// (for Phi-1's 24 layers, every 128 / 24 ≈ 5 positions' worth of work), and the chunk it cuts
/// is thrown away.
pub const PREFILL_CHUNK: usize = 128;

/// A prefill that may go on for newer jobs (`keep_prefilling`: [`Slot::sync_serving`]) runs its last
/// this many positions as a chunk of their own. Typing changes the tokens at the cursor, and a
/// chunk cut short is thrown away, so the positions before them must not share a chunk with them.
pub const PREFILL_TAIL: usize = 16;

/// Asked, while a cancelled job prefills, whether the prompt's positions through the chunk in hand
/// (the prefix given) are still worth computing for a newer job.
pub type KeepPrefilling<'a> = &'a dyn Fn(&[u32]) -> bool;

/// The chunks, `(start, end)`, in which `n` new positions are prefilled: [`PREFILL_CHUNK`] at a
/// time, the last [`PREFILL_TAIL`] apart when `tail` (and there is more than a tail).
fn chunk_bounds(n: usize, tail: bool) -> Vec<(usize, usize)> {
    let body = if tail && n > PREFILL_TAIL {
        n - PREFILL_TAIL
    } else {
        n
    };
    let mut bounds: Vec<(usize, usize)> = (0..body)
        .step_by(PREFILL_CHUNK)
        .map(|start| (start, (start + PREFILL_CHUNK).min(body)))
        .collect();
    if body < n {
        bounds.push((body, n));
    }
    bounds
}

/// A KV cache and the token ids it holds. Invariant: `ids.len() == cache.len()`.
pub struct Slot {
    cache: KvCache,
    ids: Vec<u32>,
    positions_run: u64,
}

/// What one [`Slot::sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Positions kept from the cache (the longest common prefix of ids, at most `len - 1`).
    pub reused: usize,
    /// Positions run through the model.
    pub prefilled: usize,
}

pub enum SyncOutcome {
    /// f32 logits `[vocab]` of the prompt's last position.
    Ready(Tensor, SyncStats),
    /// The cancel check fired between chunks; the slot holds the prefix computed so far.
    Cancelled(SyncStats),
}

impl Slot {
    pub fn new(model: &PhiModel, capacity: usize) -> Result<Self> {
        Ok(Slot {
            cache: model.new_cache(capacity)?,
            ids: Vec::new(),
            positions_run: 0,
        })
    }

    /// The ids whose K/V the cache holds.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Positions run through the model by this slot since it was made (every sync and decode step).
    pub fn positions_run(&self) -> u64 {
        self.positions_run
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.ids.truncate(len);
    }

    /// Runs `ids` through the model after the cache and records them; `None` when `cancelled`
    /// fired first. Keeps the invariant whatever happens: a failed or cancelled forward leaves the
    /// cache at its old length.
    fn forward(
        &mut self,
        model: &PhiModel,
        ids: &[u32],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        let before = self.cache.len();
        match model.forward_unless_cancelled(ids, &mut self.cache, false, cancelled) {
            Ok(Some(logits)) => {
                self.ids.extend_from_slice(ids);
                self.positions_run += ids.len() as u64;
                Ok(Some(logits.squeeze(0)?))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.cache.truncate(before);
                Err(e)
            }
        }
    }

    /// Runs `next` and `drafts` after the cache in one [`PhiModel::forward_alone`] pass and
    /// records them: logits `[1 + drafts, vocab]`, `None` when `cancelled` fired first.
    fn forward_alone(
        &mut self,
        model: &PhiModel,
        next: &[u32],
        drafts: &[u32],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<Tensor>> {
        let ids = [next, drafts].concat();
        let before = self.cache.len();
        match model.forward_alone(&ids, &mut self.cache, cancelled) {
            Ok(Some(logits)) => {
                self.ids.extend_from_slice(&ids);
                self.positions_run += ids.len() as u64;
                Ok(Some(logits))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.cache.truncate(before);
                Err(e)
            }
        }
    }

    /// Brings the cache to `prompt`: keeps the longest common prefix of ids (never text: BPE is not
    /// prefix-stable), drops the rest, and runs only the new positions — at least the last one, for
    /// its logits.
    pub fn sync(
        &mut self,
        model: &PhiModel,
        prompt: &[u32],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<SyncOutcome> {
        self.sync_serving(model, prompt, cancelled, None)
    }

    /// [`Self::sync`], where a prefill that `cancelled` would stop goes on while `keep_prefilling`
    /// says the prompt's positions through the chunk in hand (the prefix it is given) are worth
    /// computing for a newer job, which then finds them in the cache: a keystroke at the same place
    /// does not throw away the prefill the last one started. With it, the last [`PREFILL_TAIL`]
    /// positions are a chunk of their own.
    pub fn sync_serving(
        &mut self,
        model: &PhiModel,
        prompt: &[u32],
        cancelled: &dyn Fn() -> bool,
        keep_prefilling: Option<KeepPrefilling<'_>>,
    ) -> Result<SyncOutcome> {
        if prompt.is_empty() {
            return Err(crate::EngineError::Request("the prompt has no tokens".into()));
        }
        let common = common_prefix(&self.ids, prompt).min(prompt.len() - 1);
        self.truncate(common);
        let mut stats = SyncStats {
            reused: common,
            prefilled: 0,
        };
        let mut logits = None;
        for (start, end) in chunk_bounds(prompt.len() - common, keep_prefilling.is_some()) {
            let through = &prompt[..common + end];
            let stop = || cancelled() && !keep_prefilling.is_some_and(|keep| keep(through));
            match self.forward(model, &prompt[common + start..common + end], &stop)? {
                Some(chunk_logits) => logits = Some(chunk_logits),
                None => return Ok(SyncOutcome::Cancelled(stats)),
            }
            stats.prefilled += end - start;
        }
        // Kept for a newer job alone: it generates nothing.
        if cancelled() {
            return Ok(SyncOutcome::Cancelled(stats));
        }
        match logits {
            Some(logits) => Ok(SyncOutcome::Ready(logits, stats)),
            None => Err(crate::EngineError::Request("nothing to run".into())),
        }
    }
}

pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Greedy (`temperature == 0`, the default: completions must be reproducible) or temperature with
/// nucleus (top-p) sampling from a seeded generator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops at this instant with what it has.
    pub deadline: Option<Instant>,
    /// Most prompt-lookup drafts ([`crate::draft`]) verified with each decode step, in one pass
    /// that computes every row as a decode step does ([`PhiModel::forward_alone`]): the tokens are
    /// those of plain greedy decoding, in fewer passes where the text repeats what came before.
    /// 0 decodes one token per pass. Applies to greedy sampling where
    /// [`PhiModel::verifies_alone`]; elsewhere generation decodes one token per pass.
    pub draft: usize,
    /// Token healing: bytes the generated text must begin with (the text of the prompt's last
    /// token, which the caller dropped from the prompt). Until they are written, each token is
    /// chosen among those that [`heals`](crate::tokenizer::heals) what is left of them, never a
    /// special token nor an id the tokenizer lacks; then generation goes on as usual. Empty: no
    /// constraint. The tokens that write it count towards `max_new_tokens`, and the stop rule and
    /// the result's text see them.
    pub prefix: Vec<u8>,
    /// Teacher forcing, for `phi-lsp bench --replay` only: the tokens chosen are these, in order,
    /// then end of text, whatever the logits say (every forward pass still runs, and drafts are
    /// accepted where they agree with it). The server never sets it.
    pub script: Option<std::sync::Arc<[u32]>>,
}

/// [`GenerateParams::draft`]'s default.
pub const DEFAULT_DRAFT: usize = 3;

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 64,
            sampling: Sampling::default(),
            deadline: None,
            draft: DEFAULT_DRAFT,
            prefix: Vec::new(),
            script: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfText,
    MaxTokens,
    Deadline,
    /// The caller's predicate on the text said stop.
    Predicate,
    /// The cache is full.
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Draft tokens verified, and those of them accepted (greedy chose them).
    pub drafted_tokens: usize,
    pub accepted_tokens: usize,
    /// Forward passes after the prefill (decode steps, each with its drafts).
    pub decode_passes: usize,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// New tokens, without the end-of-text token.
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub stats: GenerationStats,
}

pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
    /// Ids at or above this are not in the vocabulary and are never produced.
    n_valid: usize,
}

impl Sampler {
    pub fn new(sampling: Sampling, n_valid: usize) -> Self {
        Sampler {
            sampling,
            rng: StdRng::seed_from_u64(sampling.seed),
            n_valid,
        }
    }

    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_vec1()?;
        let valid = &logits[..self.n_valid.min(logits.len())];
        if self.sampling.temperature <= 0.0 {
            return Ok(argmax(valid));
        }
        Ok(self.sample_top_p(valid))
    }

    /// Like [`Sampler::sample`], among `allowed` ids only (increasing; ids outside the vocabulary
    /// are skipped). Greedy takes the first largest logit among them, as `argmax` over logits with
    /// every other id at -inf does; `None` when no allowed id is in the vocabulary.
    pub fn sample_among(&mut self, logits: &Tensor, allowed: &[u32]) -> Result<Option<u32>> {
        let logits: Vec<f32> = logits.to_vec1()?;
        let n_valid = self.n_valid.min(logits.len());
        let allowed: Vec<u32> = allowed
            .iter()
            .copied()
            .filter(|&id| (id as usize) < n_valid)
            .collect();
        if allowed.is_empty() {
            return Ok(None);
        }
        if self.sampling.temperature <= 0.0 {
            let mut best = allowed[0];
            for &id in &allowed[1..] {
                if logits[id as usize] > logits[best as usize] {
                    best = id;
                }
            }
            return Ok(Some(best));
        }
        let mut masked = vec![f32::NEG_INFINITY; n_valid];
        for &id in &allowed {
            masked[id as usize] = logits[id as usize];
        }
        Ok(Some(self.sample_top_p(&masked)))
    }

    fn sample_top_p(&mut self, logits: &[f32]) -> u32 {
        let t = self.sampling.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = logits
            .iter()
            .map(|&l| ((l - max) / t).exp())
            .enumerate()
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Keep the smallest set of most likely tokens whose mass reaches top_p.
        let mut kept = 0;
        let mut mass = 0.0;
        for &(_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= self.sampling.top_p as f32 {
                break;
            }
        }
        probs.truncate(kept.max(1));
        let kept_total: f32 = probs.iter().map(|p| p.1).sum();
        let mut draw = self.rng.random::<f32>() * kept_total;
        for &(idx, p) in &probs {
            if draw < p {
                return idx as u32;
            }
            draw -= p;
        }
        probs.last().map(|p| p.0 as u32).unwrap_or(0)
    }
}

/// The first maximum, as `torch.argmax` picks it.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (idx, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = idx;
        }
    }
    best as u32
}

/// What watches a generation while it runs.
pub struct Watch<'a> {
    /// Sees the complete text so far after each token; `true` ends the generation
    /// ([`StopReason::Predicate`]).
    pub stop: &'a mut dyn FnMut(&str) -> bool,
    /// Polled before every layer of the prefill and after every token; `true` ends it
    /// ([`StopReason::Cancelled`]).
    pub cancelled: &'a dyn Fn() -> bool,
    /// While `cancelled` fires during the prefill: whether the prompt's positions through the
    /// chunk in hand (the prefix given) are worth computing for a newer job ([`Slot::sync_serving`]);
    /// `None`: never, the prefill stops at once.
    pub keep_prefilling: Option<KeepPrefilling<'a>>,
    /// Sees the figures so far after the prefill and after each token, while it runs.
    pub progress: Option<&'a mut dyn FnMut(&GenerationStats)>,
}

/// Generates after `prompt` in `slot` with `engine`'s model and tokenizer. The slot stays
/// consistent whatever the outcome: it holds exactly the ids whose K/V it computed.
pub fn generate(
    engine: &Engine,
    slot: &mut Slot,
    prompt: &[u32],
    params: &GenerateParams,
    watch: Watch<'_>,
) -> Result<Generation> {
    let Watch {
        stop,
        cancelled,
        keep_prefilling,
        mut progress,
    } = watch;
    let mut report = |stats: &GenerationStats| {
        if let Some(progress) = progress.as_mut() {
            progress(stats);
        }
    };
    let (model, tokenizer) = (&engine.model, engine.tokenizer.as_ref());
    let start = Instant::now();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut generation = Generation {
        prompt_tokens: prompt.to_vec(),
        tokens: Vec::new(),
        text: String::new(),
        stop: StopReason::Cancelled,
        stats: GenerationStats::default(),
    };
    let mut logits = match slot.sync_serving(model, prompt, cancelled, keep_prefilling)? {
        SyncOutcome::Ready(logits, sync) => {
            stats.reused_tokens = sync.reused;
            stats.prefilled_tokens = sync.prefilled;
            logits
        }
        SyncOutcome::Cancelled(sync) => {
            stats.reused_tokens = sync.reused;
            stats.prefilled_tokens = sync.prefilled;
            stats.prefill_ms = ms(start.elapsed());
            generation.stats = stats;
            return Ok(generation);
        }
    };
    stats.prefill_ms = ms(start.elapsed());
    report(&stats);
    let decode_start = Instant::now();
    let mut sampler = Sampler::new(params.sampling, tokenizer.size());
    let mut stream = TextStream::default();
    let draft = if params.sampling.temperature <= 0.0 && model.verifies_alone() {
        params.draft.min(PhiModel::MAX_ALONE - 1)
    } else {
        0
    };
    // Logits of positions already in the cache (accepted drafts) that no token was sampled from
    // yet, oldest first.
    let mut ahead: std::collections::VecDeque<Tensor> = std::collections::VecDeque::new();
    // What of the healed prefix is still to be written.
    let mut remaining: &[u8] = &params.prefix;
    let reason = loop {
        if generation.tokens.len() >= params.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let next = if let Some(script) = &params.script {
            match script.get(generation.tokens.len()) {
                Some(&token) => token,
                None => break StopReason::EndOfText,
            }
        } else if remaining.is_empty() {
            sampler.sample(&logits)?
        } else {
            let allowed = tokenizer.healing_ids(remaining);
            let Some(next) = sampler.sample_among(&logits, &allowed)? else {
                return Err(crate::EngineError::Request(
                    "no token of the vocabulary writes the healed text".into(),
                ));
            };
            let written = tokenizer.token_bytes(next).map_or(0, <[u8]>::len);
            remaining = remaining.get(written..).unwrap_or_default();
            next
        };
        if Some(next) == tokenizer.eos_id() {
            break StopReason::EndOfText;
        }
        generation.tokens.push(next);
        stream.push(tokenizer, next)?;
        stats.generated_tokens = generation.tokens.len();
        stats.decode_ms = ms(decode_start.elapsed());
        report(&stats);
        if stop(stream.text()) {
            break StopReason::Predicate;
        }
        if generation.tokens.len() >= params.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if params.deadline.is_some_and(|d| Instant::now() >= d) {
            break StopReason::Deadline;
        }
        if cancelled() {
            break StopReason::Cancelled;
        }
        if let Some(known) = ahead.pop_front() {
            // `next` is an accepted draft: its position and logits are computed already.
            logits = known;
            continue;
        }
        if slot.ids().len() + 1 > slot.capacity() {
            break StopReason::ContextFull;
        }
        // Drafts beyond the tokens still wanted, or the cache's room, are never used.
        let wanted = params.max_new_tokens - generation.tokens.len() - 1;
        let room = slot.capacity() - slot.ids().len() - 1;
        let mut history = slot.ids().to_vec();
        history.push(next);
        // No drafts while healing: their verification would need the constrained choice, and the
        // healed text is a token or two.
        let drafts = if remaining.is_empty() {
            draft.min(wanted).min(room)
        } else {
            0
        };
        let drafted = crate::draft::lookup(&history, drafts).to_vec();
        stats.decode_passes += 1;
        if drafted.is_empty() {
            logits = match slot.forward(model, &[next], &|| false)? {
                Some(logits) => logits,
                None => break StopReason::Cancelled,
            };
            continue;
        }
        let rows = match slot.forward_alone(model, &history[history.len() - 1..], &drafted, cancelled)? {
            Some(rows) => rows,
            None => break StopReason::Cancelled,
        };
        // Row i holds the logits after `next` and the first i drafts; greedy accepts draft i
        // where row i chooses it.
        let mut accepted = 0;
        while accepted < drafted.len() {
            let chosen = match &params.script {
                Some(script) => script.get(generation.tokens.len() + accepted).copied(),
                None => Some(sampler.sample(&rows.get(accepted)?)?),
            };
            if chosen != Some(drafted[accepted]) {
                break;
            }
            accepted += 1;
        }
        slot.truncate(slot.ids().len() - (drafted.len() - accepted));
        stats.drafted_tokens += drafted.len();
        stats.accepted_tokens += accepted;
        for row in 1..=accepted {
            ahead.push_back(rows.get(row)?);
        }
        logits = rows.get(0)?;
    };
    // Accepted drafts not reached (a stop rule fired first) leave the cache as plain decoding
    // would: without them.
    slot.truncate(slot.ids().len() - ahead.len());
    stats.generated_tokens = generation.tokens.len();
    stats.decode_ms = ms(decode_start.elapsed());
    generation.text = stream.finish(tokenizer)?;
    generation.stop = reason;
    generation.stats = stats;
    Ok(generation)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_bounds_cover_the_positions_once_with_the_tail_apart() {
        assert_eq!(chunk_bounds(300, false), [(0, 128), (128, 256), (256, 300)]);
        assert_eq!(
            chunk_bounds(300, true),
            [(0, 128), (128, 256), (256, 284), (284, 300)]
        );
        assert_eq!(chunk_bounds(272, true), [(0, 128), (128, 256), (256, 272)]);
        assert_eq!(chunk_bounds(16, true), [(0, 16)]);
        assert_eq!(chunk_bounds(1, true), [(0, 1)]);
        assert_eq!(chunk_bounds(0, true), []);
    }

    #[test]
    fn common_prefix_counts_equal_leading_ids() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[5], &[6]), 0);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[0.5]), 0);
    }

    #[test]
    fn sampling_masks_ids_outside_the_vocabulary() {
        let device = candle_core::Device::Cpu;
        // The largest logit is at id 4, which a 4-token vocabulary does not have.
        let logits = Tensor::new(&[0.0f32, 1.0, 0.5, 0.2, 9.0], &device).expect("tensor");
        let mut greedy = Sampler::new(Sampling::default(), 4);
        assert_eq!(greedy.sample(&logits).expect("samples"), 1);
        let hot = Sampling {
            temperature: 5.0,
            top_p: 1.0,
            seed: 7,
        };
        let mut sampler = Sampler::new(hot, 4);
        for _ in 0..200 {
            assert!(sampler.sample(&logits).expect("samples") < 4);
        }
    }

    #[test]
    fn sampling_among_allowed_ids() {
        let device = candle_core::Device::Cpu;
        let logits = Tensor::new(&[0.0f32, 5.0, 2.0, 2.0, 9.0], &device).expect("tensor");
        let mut greedy = Sampler::new(Sampling::default(), 4);
        // Id 1 is the best of all but not allowed; 2 and 3 tie, and the first one wins.
        assert_eq!(
            greedy.sample_among(&logits, &[0, 2, 3]).expect("samples"),
            Some(2)
        );
        // Id 4 is outside the vocabulary, so nothing allowed is left.
        assert_eq!(greedy.sample_among(&logits, &[4]).expect("samples"), None);
        let hot = Sampling {
            temperature: 5.0,
            top_p: 1.0,
            seed: 3,
        };
        let mut sampler = Sampler::new(hot, 4);
        for _ in 0..100 {
            let id = sampler.sample_among(&logits, &[0, 3]).expect("samples");
            assert!(matches!(id, Some(0 | 3)), "{id:?}");
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_top_p_narrows() {
        let device = candle_core::Device::Cpu;
        let logits = Tensor::new(&[2.0f32, 1.9, 0.0, -1.0], &device).expect("tensor");
        let params = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 42,
        };
        let draw = |s: Sampling| -> Vec<u32> {
            let mut sampler = Sampler::new(s, 4);
            (0..50)
                .map(|_| sampler.sample(&logits).expect("samples"))
                .collect()
        };
        assert_eq!(draw(params), draw(params));
        assert!(
            draw(params).iter().any(|&id| id >= 2),
            "all four ids are possible at top_p 1"
        );
        let narrow = Sampling { top_p: 0.4, ..params };
        assert!(
            draw(narrow).iter().all(|&id| id == 0),
            "top_p 0.4 keeps only the most likely id (p = 0.48)"
        );
    }
}
