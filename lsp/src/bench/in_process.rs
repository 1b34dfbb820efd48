//! The in-process runs of one dtype: prefill, first token, decode after the prompt, and keystrokes
//! on a slot that keeps the previous prompt's cache against one emptied each time.

use std::time::Instant;

use anyhow::{bail, Result};
use phi_engine::{generate, Engine, GenerateParams, Slot, SyncOutcome, Watch, WeightDType};

use super::keystroke::KeystrokeText;
use super::stats::{ms, Spread};
use super::{progress, LINE_TOKENS, SHORT_PROMPT_TOKENS, SLOT_CAPACITY};
use crate::args::BenchArgs;

fn never() -> bool {
    false
}

/// A watch that never stops or cancels: the bench's runs end at their token count.
fn watch(no_stop: &mut dyn FnMut(&str) -> bool) -> Watch<'_> {
    Watch {
        stop: no_stop,
        cancelled: &never,
        keep_prefilling: None,
        progress: None,
    }
}

/// The in-process measurements of one dtype.
pub struct Runs {
    pub prompt_tokens: usize,
    pub warmup_ms: f64,
    pub prefill: Spread,
    pub first_token: Spread,
    pub decode: Spread,
    pub decode_ms_per_token: f64,
    /// Drafts verified in the decode runs: 0, as the figure is plain decoding.
    pub decode_drafted_tokens: usize,
    pub keystroke_cached: Spread,
    pub keystroke_uncached: Spread,
    pub keystroke_prefill_cached: Spread,
    pub keystroke_prefill_uncached: Spread,
    pub keystroke_prefilled_cached: Vec<usize>,
    pub keystroke_generated: Vec<usize>,
    /// Median ms of one verify pass (`forward_alone`) of 1, 4 and 8 rows after the prompt.
    pub verify_rows_ms: Vec<(usize, f64)>,
    /// Decode after the prompt with `--draft` drafts against without: time ratio (medians) and
    /// the share of drafts accepted.
    pub draft_speedup: f64,
    pub draft_acceptance: f64,
}

/// Every in-process measurement of one dtype, on the loaded `engine`.
pub fn measure_in_process(
    engine: &Engine,
    dtype: WeightDType,
    args: &BenchArgs,
    text: &KeystrokeText,
) -> Result<Runs> {
    let name = dtype.name();
    let model = &engine.model;
    let tokenizer = engine.tokenizer.as_ref();
    let prompt = &text.prefix_ids;
    // The keystrokes draft as the server does; prefill, first token and the decode figure are
    // plain decoding, one token per pass, as every other engine's figures are.
    let params = |max_new_tokens: usize| GenerateParams {
        max_new_tokens,
        draft: args.draft,
        ..Default::default()
    };
    let plain = |max_new_tokens: usize| GenerateParams {
        draft: 0,
        ..params(max_new_tokens)
    };
    let mut no_stop = |_: &str| false;
    let mut slot = Slot::new(model, SLOT_CAPACITY)?;

    // Warm-up: candle repacks quantized weights on their first use, for one row and for many.
    progress(&format!("{name}: warm-up (prefill {} + 2 tokens)", prompt.len()));
    let start = Instant::now();
    generate(engine, &mut slot, prompt, &params(2), watch(&mut no_stop))?;
    let warmup_ms = ms(start.elapsed());

    let mut prefill = Vec::new();
    for run in 0..args.repeats {
        slot.clear();
        let start = Instant::now();
        match slot.sync(model, prompt, &never)? {
            SyncOutcome::Ready(..) => {}
            SyncOutcome::Cancelled(_) => bail!("prefill was cancelled"),
        }
        let rate = prompt.len() as f64 / start.elapsed().as_secs_f64();
        progress(&format!(
            "{name}: prefill {} run {}: {rate:.1} tok/s",
            prompt.len(),
            run + 1
        ));
        prefill.push(rate);
    }

    let mut first_token = Vec::new();
    for _ in 0..args.repeats {
        slot.clear();
        let start = Instant::now();
        generate(
            engine,
            &mut slot,
            &prompt[..SHORT_PROMPT_TOKENS],
            &plain(1),
            watch(&mut no_stop),
        )?;
        first_token.push(ms(start.elapsed()));
    }
    progress(&format!(
        "{name}: first token after {SHORT_PROMPT_TOKENS}: {:.0} ms",
        Spread::of(&first_token).median
    ));

    // Decode after the 512-token prompt; each run reuses the prompt's cache (one position re-run).
    slot.clear();
    let mut decode = Vec::new();
    let mut decode_ms_per_token = Vec::new();
    let mut decode_drafted_tokens = 0;
    for run in 0..args.repeats {
        let generation = generate(
            engine,
            &mut slot,
            prompt,
            &plain(args.decode_tokens + 1),
            watch(&mut no_stop),
        )?;
        // The first token comes from the prompt's logits; each later one is one forward.
        let steps = generation.stats.generated_tokens.saturating_sub(1);
        if steps == 0 {
            progress(&format!(
                "{name}: decode run {} ended at once ({:?})",
                run + 1,
                generation.stop
            ));
            continue;
        }
        let rate = steps as f64 / (generation.stats.decode_ms / 1000.0);
        progress(&format!(
            "{name}: decode run {}: {rate:.2} tok/s over {steps} tokens",
            run + 1
        ));
        decode.push(rate);
        decode_ms_per_token.push(generation.stats.decode_ms / steps as f64);
        decode_drafted_tokens += generation.stats.drafted_tokens;
    }

    // Keystrokes: the cached slot holds the previous prompt and its suggestion, as in the editor;
    // the fresh one is emptied each time (a full prefill).
    let mut cached_slot = Slot::new(model, SLOT_CAPACITY)?;
    generate(
        engine,
        &mut cached_slot,
        prompt,
        &params(LINE_TOKENS),
        watch(&mut no_stop),
    )?;
    let (mut cached, mut uncached, mut cached_prefill, mut uncached_prefill) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prefilled, mut generated) = (Vec::new(), Vec::new());
    for keystroke in 1..=args.repeats {
        let document = text.after(keystroke);
        for (use_cache, times, prefill_times) in [
            (true, &mut cached, &mut cached_prefill),
            (false, &mut uncached, &mut uncached_prefill),
        ] {
            let target_slot = if use_cache { &mut cached_slot } else { &mut slot };
            if !use_cache {
                target_slot.clear();
            }
            let start = Instant::now();
            let ids = tokenizer.encode(&document)?;
            let generation = generate(
                engine,
                target_slot,
                &ids,
                &params(LINE_TOKENS),
                watch(&mut no_stop),
            )?;
            times.push(ms(start.elapsed()));
            prefill_times.push(generation.stats.prefill_ms);
            if use_cache {
                prefilled.push(generation.stats.prefilled_tokens);
                generated.push(generation.stats.generated_tokens);
            }
        }
        progress(&format!(
            "{name}: keystroke {keystroke}: cached {:.0} ms, uncached {:.0} ms",
            cached.last().copied().unwrap_or(f64::NAN),
            uncached.last().copied().unwrap_or(f64::NAN)
        ));
    }

    // One verify pass of n rows after the prompt, rolled back after each run.
    let mut cache = model.new_cache(SLOT_CAPACITY)?;
    model.forward(prompt, &mut cache, false)?;
    let mut verify_rows_ms = Vec::new();
    for n in [1, 4, 8] {
        let mut times = Vec::new();
        for _ in 0..args.repeats.max(3) {
            let start = Instant::now();
            model.forward_alone(&prompt[..n], &mut cache, &never)?;
            times.push(ms(start.elapsed()));
            cache.truncate(prompt.len());
        }
        let median = Spread::of(&times).median;
        progress(&format!("{name}: verify pass of {n} rows: {median:.1} ms"));
        verify_rows_ms.push((n, median));
    }
    // Decode after the prompt without drafts and with `--draft`, in turn.
    let (mut plain_ms, mut drafted_ms, mut drafted, mut accepted) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..args.repeats {
        for draft in [0, args.draft.max(1)] {
            slot.clear();
            let p = GenerateParams {
                max_new_tokens: args.decode_tokens,
                draft,
                ..Default::default()
            };
            let g = generate(engine, &mut slot, prompt, &p, watch(&mut no_stop))?;
            if draft == 0 {
                plain_ms.push(g.stats.decode_ms);
            } else {
                drafted_ms.push(g.stats.decode_ms);
                drafted += g.stats.drafted_tokens;
                accepted += g.stats.accepted_tokens;
            }
        }
    }
    let draft_speedup = Spread::of(&plain_ms).median / Spread::of(&drafted_ms).median;
    let draft_acceptance = accepted as f64 / drafted.max(1) as f64;
    progress(&format!(
        "{name}: decode with drafts {draft_speedup:.2}x faster, {accepted} of {drafted} drafts accepted"
    ));

    Ok(Runs {
        verify_rows_ms,
        draft_speedup,
        draft_acceptance,
        prompt_tokens: prompt.len(),
        warmup_ms,
        prefill: Spread::of(&prefill),
        first_token: Spread::of(&first_token),
        decode: Spread::of(&decode),
        decode_ms_per_token: Spread::of(&decode_ms_per_token).median,
        decode_drafted_tokens,
        keystroke_cached: Spread::of(&cached),
        keystroke_uncached: Spread::of(&uncached),
        keystroke_prefill_cached: Spread::of(&cached_prefill),
        keystroke_prefill_uncached: Spread::of(&uncached_prefill),
        keystroke_prefilled_cached: prefilled,
        keystroke_generated: generated,
    })
}
