//! Incremental detokenization on a byte-level BPE whose tokens split multi-byte characters.

use std::sync::Arc;

use _core::detokenizer::IncrementalDetokenizer;
use _core::tokenizer::Tokenizer;

fn tok() -> Arc<Tokenizer> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rust/tests/fixtures/byte_bpe.json"
    );
    Arc::new(Tokenizer::from_file(path).unwrap())
}

const TEXTS: &[&str] = &[
    "Grüße aus München 日本語 🙂🚀 привет, мир!",
    "中文文本：你好，世界！",
    "한국어 문장입니다 ∑∫√ Ça va",
];

#[test]
fn pieces_are_whole_characters_and_concatenate_to_the_text() {
    let tok = tok();
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        // The fixture really splits characters across tokens.
        assert!(ids
            .iter()
            .any(|&i| tok.decode(&[i], false).unwrap().contains('\u{FFFD}')));
        let mut d = IncrementalDetokenizer::new(tok.clone(), true, vec![]);
        let mut out = String::new();
        for &id in &ids {
            let (piece, stop) = d.push(id);
            assert!(!stop);
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(out, *text);
        assert_eq!(d.text(), *text);
    }
}

#[test]
fn random_ids_concatenate_to_the_full_decode() {
    let tok = tok();
    let mut x = 0x9E3779B97F4A7C15u64;
    for _ in 0..200 {
        let ids: Vec<u32> = (0..30)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 402) as u32 // includes two ids past the vocab
            })
            .collect();
        let mut d = IncrementalDetokenizer::new(tok.clone(), true, vec![]);
        let mut out: String = ids.iter().map(|&i| d.push(i).0).collect();
        out.push_str(&d.flush().0);
        let known: Vec<u32> = ids.iter().copied().filter(|&i| i < 400).collect();
        assert_eq!(out, tok.decode(&known, true).unwrap());
        assert_eq!(d.text(), out);
    }
}

#[test]
fn stop_string_spanning_tokens_cuts_the_text() {
    let tok = tok();
    let text = "Grüße aus München 日本語 und mehr";
    let ids = tok.encode(text, false).unwrap();
    let stop = "日本語";
    assert!(ids
        .iter()
        .all(|&i| !tok.decode(&[i], false).unwrap().contains(stop)));
    let mut d = IncrementalDetokenizer::new(tok.clone(), true, vec!["nothing".into(), stop.into()]);
    let mut out = String::new();
    let mut hit_at = None;
    for (k, &id) in ids.iter().enumerate() {
        let (piece, stop) = d.push(id);
        out.push_str(&piece);
        if stop && hit_at.is_none() {
            hit_at = Some(k);
        }
    }
    assert_eq!(d.text(), "Grüße aus München ");
    assert_eq!(out, d.text());
    // It stops at the token completing the stop string, not later.
    let k = hit_at.unwrap();
    assert!(tok.decode(&ids[..=k], false).unwrap().contains(stop));
    assert!(!tok.decode(&ids[..k], false).unwrap().contains(stop));
}

#[test]
fn earliest_stop_string_wins_even_if_it_began_in_emitted_text() {
    let tok = tok();
    let ids = tok
        .encode("Hello world! The quick brown fox", false)
        .unwrap();
    let mut d =
        IncrementalDetokenizer::new(tok.clone(), true, vec!["quick".into(), "world! The".into()]);
    let mut out = String::new();
    let mut hit = false;
    for &i in &ids {
        let (piece, stop) = d.push(i);
        out.push_str(&piece);
        hit |= stop;
    }
    assert!(hit);
    assert_eq!(d.text(), "Hello ");
    assert_eq!(out, "Hello ");
    assert_eq!(d.push(ids[0]), (String::new(), true));
}

#[test]
fn special_tokens_are_skipped_or_kept() {
    let tok = tok();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    let mut ids = tok.encode("Hi 🙂", false).unwrap();
    ids.push(eot);
    let mut skip = IncrementalDetokenizer::new(tok.clone(), true, vec![]);
    let mut keep = IncrementalDetokenizer::new(tok.clone(), false, vec![]);
    for &i in &ids {
        skip.push(i);
        keep.push(i);
    }
    assert_eq!(skip.text(), "Hi 🙂");
    assert_eq!(keep.text(), "Hi 🙂<|endoftext|>");
    assert_eq!(tok.vocab_size(), 400);
}

#[test]
fn held_back_stop_prefix_is_released_when_it_does_not_match() {
    let tok = tok();
    let ids = tok.encode("the lazy dog", false).unwrap();
    let mut d = IncrementalDetokenizer::new(tok.clone(), true, vec!["lazy cat".into()]);
    let mut out: String = ids.iter().map(|&i| d.push(i).0).collect();
    assert!(out.len() < "the lazy dog".len() || out == "the lazy dog");
    out.push_str(&d.flush().0);
    assert_eq!(out, "the lazy dog");
    assert_eq!(d.text(), "the lazy dog");
}

#[test]
fn random_ids_with_stop_strings_release_exactly_the_text() {
    let tok = tok();
    let mut x = 0x2545F4914F6CDD1Du64;
    let stops = vec!["e ".to_string(), "日本".to_string(), "ö".to_string()];
    for _ in 0..300 {
        let ids: Vec<u32> = (0..25)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 400) as u32
            })
            .collect();
        let mut d = IncrementalDetokenizer::new(tok.clone(), true, stops.clone());
        let mut out = String::new();
        let mut stopped = false;
        for &i in &ids {
            let (piece, stop) = d.push(i);
            out.push_str(&piece);
            stopped |= stop;
        }
        out.push_str(&d.flush().0);
        let full = tok.decode(&ids, true).unwrap();
        assert_eq!(out, d.text());
        assert!(full.starts_with(&out));
        assert!(stops.iter().all(|s| !out.contains(s.as_str())));
        assert_eq!(stopped, out.len() < full.len(), "{full:?} vs {out:?}");
    }
}
