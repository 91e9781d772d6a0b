//! Incremental detokenization with stop strings.
//!
//! Byte-level BPE tokens can end in the middle of a UTF-8 character, so decoding token by token
//! would emit U+FFFD. As in vLLM/TGI we decode a sliding window `ids[prefix_offset..]` and only
//! emit (and slide) once the window no longer ends with U+FFFD; the text of the window's first
//! part `ids[prefix_offset..read_offset]` was already emitted and is cut off the front.
//! Text that could be the start of a stop string is held back until it is known not to be one,
//! so the pieces `push` returns always concatenate to `text()`.

use std::sync::Arc;

use crate::tokenizer::Tokenizer;

pub struct IncrementalDetokenizer {
    tok: Arc<Tokenizer>,
    skip_special_tokens: bool,
    stop: Vec<String>,
    max_stop_len: usize,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    emitted: usize, // bytes of `text` returned by push/flush
    stopped: bool,
}

impl IncrementalDetokenizer {
    pub fn new(tok: Arc<Tokenizer>, skip_special_tokens: bool, stop: Vec<String>) -> Self {
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let max_stop_len = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        Self {
            tok,
            skip_special_tokens,
            stop,
            max_stop_len,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// The text so far, cut before the first stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds one token; returns the text it releases and whether a stop string was hit.
    pub fn push(&mut self, id: u32) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.ids.push(id);
        match self.window_delta(false) {
            Some(delta) => self.append(&delta),
            None => (String::new(), false),
        }
    }

    /// At the end of generation: releases everything held back, including a trailing incomplete
    /// character (as U+FFFD).
    pub fn flush(&mut self) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let (mut piece, stop) = match self.window_delta(true) {
            Some(delta) => self.append(&delta),
            None => (String::new(), false),
        };
        piece += &self.release(self.text.len());
        (piece, stop)
    }

    fn decode(&self, ids: &[u32]) -> String {
        // An id the tokenizer cannot decode contributes nothing rather than failing generation.
        self.tok
            .decode(ids, self.skip_special_tokens)
            .unwrap_or_default()
    }

    fn window_delta(&mut self, force: bool) -> Option<String> {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let new = self.decode(&self.ids[self.prefix_offset..]);
        if new.len() <= prefix.len() || (!force && new.ends_with('\u{FFFD}')) {
            return None;
        }
        // The window's text normally extends the prefix's; if a decoder rewrote it, keep to char bounds.
        let mut start = prefix.len();
        while !new.is_char_boundary(start) {
            start += 1;
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Some(new[start..].to_string())
    }

    /// Appends decoded text, cuts it at a stop string, and returns what can be released.
    fn append(&mut self, delta: &str) -> (String, bool) {
        let old_len = self.text.len();
        self.text.push_str(delta);
        if self.max_stop_len == 0 {
            return (self.release(self.text.len()), false);
        }
        // Only a match that ends in the new text can be new: start max_stop_len-1 bytes back.
        let mut from = old_len.saturating_sub(self.max_stop_len - 1);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(pos) = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min()
        {
            self.text.truncate(from + pos);
            self.stopped = true;
            return (self.release(self.text.len()), true);
        }
        // Hold back the longest suffix that a stop string starts with.
        let hold = self
            .stop
            .iter()
            .filter_map(|s| {
                s.char_indices()
                    .rev()
                    .map(|(k, _)| k)
                    .find(|&k| k > 0 && self.text.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        (self.release(self.text.len() - hold), false)
    }

    fn release(&mut self, upto: usize) -> String {
        let upto = upto.max(self.emitted);
        let piece = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        piece
    }
}
