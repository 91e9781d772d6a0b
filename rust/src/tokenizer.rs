//! tokenizer.json loading (HF `tokenizers` crate) and image-placeholder expansion.

use std::path::Path;

/// A loaded tokenizer.json. Cheap to share behind an `Arc` (the scheduler and detokenizers do).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
}

impl Tokenizer {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, String> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| format!("cannot load tokenizer {}: {e}", path.display()))?;
        Ok(Self::new(inner))
    }

    pub fn from_json(json: &str) -> Result<Self, String> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| format!("invalid tokenizer json: {e}"))?;
        Ok(Self::new(inner))
    }

    fn new(inner: tokenizers::Tokenizer) -> Self {
        // get_vocab_size(true) builds the whole vocab map: compute it once.
        let vocab_size = inner.get_vocab_size(true);
        Self { inner, vocab_size }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes in parallel on the tokenizers crate's rayon pool.
    pub fn encode_batch(
        &self,
        texts: Vec<String>,
        add_special_tokens: bool,
    ) -> Result<Vec<Vec<u32>>, String> {
        let encs = self
            .inner
            .encode_batch_fast(texts, add_special_tokens)
            .map_err(|e| e.to_string())?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| e.to_string())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Expanded token ids and where each placeholder's replacement starts in them.
pub type Expanded = (Vec<u32>, Vec<usize>);

/// Replaces the i-th `placeholder` id in `ids` with `replacements[i]` (an image's tokens: its
/// embedding slots and whatever a family puts around them).
pub fn expand_placeholders(
    ids: &[u32],
    placeholder: u32,
    replacements: &[Vec<u32>],
) -> Result<Expanded, String> {
    let placeholders = ids.iter().filter(|&&t| t == placeholder).count();
    if placeholders != replacements.len() {
        return Err(format!(
            "prompt has {placeholders} image placeholder token(s) (id {placeholder}) but {} image(s) were given",
            replacements.len()
        ));
    }
    let extra: usize = replacements.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(ids.len() + extra);
    let mut starts = Vec::with_capacity(placeholders);
    let mut next = replacements.iter();
    for &t in ids {
        if t == placeholder {
            starts.push(out.len());
            out.extend_from_slice(next.next().expect("counted above"));
        } else {
            out.push(t);
        }
    }
    Ok((out, starts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_replaces_each_placeholder() {
        let (ids, starts) =
            expand_placeholders(&[1, 9, 2, 9, 3], 9, &[vec![9, 9, 9], vec![7, 9]]).unwrap();
        assert_eq!(ids, vec![1, 9, 9, 9, 2, 7, 9, 3]);
        assert_eq!(starts, vec![1, 5]);
    }

    #[test]
    fn expand_count_mismatch_names_both_counts() {
        let err = expand_placeholders(&[1, 9, 2], 9, &[vec![9], vec![9]]).unwrap_err();
        assert!(
            err.contains("1 image placeholder") && err.contains("2 image(s)"),
            "{err}"
        );
    }
}
