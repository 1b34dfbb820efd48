//! Prompt-lookup drafts for speculative decoding: the tokens that followed the most recent earlier
//! occurrence of the history's last few tokens (the prompt and what was generated), which code
//! repeats often (names, calls, whole lines). Pure logic; `generate` verifies the drafts.

/// Longest n-gram of the history's tail that is looked up.
pub const MAX_NGRAM: usize = 3;
/// Shortest n-gram looked up: single tokens (`(`, `self`) recur everywhere and draft mostly wrong.
pub const MIN_NGRAM: usize = 2;

/// Up to `k` tokens after the most recent earlier occurrence of the longest tail of `history`
/// (from [`MAX_NGRAM`] down to [`MIN_NGRAM`] tokens) that occurs earlier; empty where none does.
pub fn lookup(history: &[u32], k: usize) -> &[u32] {
    if k == 0 {
        return &[];
    }
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if history.len() <= n {
            continue;
        }
        let tail = &history[history.len() - n..];
        // Occurrences that end before the tail's last token, newest first.
        for start in (0..history.len() - n).rev() {
            if &history[start..start + n] == tail {
                let after = start + n;
                return &history[after..history.len().min(after + k)];
            }
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drafts_what_followed_the_latest_longest_match() {
        // `1 2 3` occurred at 0 (then 4 5) and `2 3` at 6 (then 9): the trigram wins.
        let history = [1, 2, 3, 4, 5, 0, 2, 3, 9, 1, 2, 3];
        assert_eq!(lookup(&history, 2), &[4, 5]);
        // Only `2 3` matches: its latest occurrence is at 6, drafts run to the history's end.
        let history = [2, 3, 4, 2, 3, 7, 8, 2, 3];
        assert_eq!(lookup(&history, 3), &[7, 8, 2]);
        assert_eq!(lookup(&history, 9), &[7, 8, 2, 3]);
    }

    #[test]
    fn no_match_no_draft() {
        assert!(lookup(&[1, 2, 3, 4], 4).is_empty());
        assert!(lookup(&[1, 1], 4).is_empty(), "one token is too short a match");
        assert!(lookup(&[5, 5, 5], 0).is_empty());
        assert!(lookup(&[], 3).is_empty());
        // A repeated token: `5 5` occurred at 0, followed by one more 5.
        assert_eq!(lookup(&[5, 5, 5], 4), &[5]);
    }
}
