//! Block manager: ref counts, LRU eviction, and prefix hits only on identical content.

use _core::block_manager::{extra_keys, hash_block, BlockManager, ImageSpan};

const BS: usize = 4;

/// Hashes of the full blocks of `tokens`, as the scheduler computes them.
fn hashes(tokens: &[u32], images: &[ImageSpan]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for i in 0..tokens.len() / BS {
        let parent = out.last().copied().unwrap_or(0);
        out.push(hash_block(
            parent,
            &tokens[i * BS..(i + 1) * BS],
            &extra_keys(images, i, BS),
        ));
    }
    out
}

/// Allocates blocks for `tokens` (after a prefix hit) and caches its full blocks, like a finished prefill.
fn prefill(bm: &mut BlockManager, tokens: &[u32], images: &[ImageSpan]) -> Vec<u32> {
    let h = hashes(tokens, images);
    let mut blocks = bm.lookup(&h, tokens, images);
    bm.take_hits(&blocks);
    let hit = blocks.len();
    assert!(bm.allocate(tokens.len().div_ceil(BS) - hit, &mut blocks));
    for i in hit..h.len() {
        let parent = i.checked_sub(1).map(|j| blocks[j]);
        bm.cache_block(
            blocks[i],
            parent,
            h[i],
            &tokens[i * BS..(i + 1) * BS],
            extra_keys(images, i, BS),
        );
    }
    blocks
}

#[test]
fn shared_prefix_ref_counts_and_release() {
    let mut bm = BlockManager::new(10, BS, true);
    let a: Vec<u32> = (0..10).collect(); // 2 full blocks + 2 tokens
    let mut b = a[..8].to_vec();
    b.extend([99, 98, 97]);
    let ba = prefill(&mut bm, &a, &[]);
    let bb = prefill(&mut bm, &b, &[]);
    assert_eq!(ba[..2], bb[..2]);
    assert_ne!(ba[2], bb[2]);
    assert_eq!(
        (bm.ref_cnt(ba[0]), bm.ref_cnt(ba[1]), bm.ref_cnt(ba[2])),
        (2, 2, 1)
    );
    assert_eq!(bm.num_free(), 10 - 4);
    bm.free(&ba);
    assert_eq!((bm.ref_cnt(ba[0]), bm.ref_cnt(ba[2])), (1, 0));
    bm.free(&bb);
    assert_eq!(bm.num_free(), 10);
    assert_eq!(bm.num_cached(), 2);
    // Cached blocks stay hittable after release.
    assert_eq!(bm.lookup(&hashes(&a, &[]), &a, &[]), ba[..2].to_vec());
}

#[test]
fn hits_require_identical_tokens_and_image_hashes() {
    let mut bm = BlockManager::new(16, BS, true);
    let img = |hash| {
        [ImageSpan {
            start: 2,
            len: 5,
            hash,
            ..Default::default()
        }]
    };
    let tokens: Vec<u32> = vec![1, 2, 7, 7, 7, 7, 7, 3, 4, 5, 6, 8, 9];
    let blocks = prefill(&mut bm, &tokens, &img(111));
    bm.free(&blocks);
    // Same image: all 3 full blocks hit.
    assert_eq!(
        bm.lookup(&hashes(&tokens, &img(111)), &tokens, &img(111))
            .len(),
        3
    );
    // Another image with the same placeholder tokens: the first block (which holds the image's
    // first two tokens) already misses.
    assert_eq!(
        bm.lookup(&hashes(&tokens, &img(222)), &tokens, &img(222))
            .len(),
        0
    );
    // Image shifted by one token: misses too.
    let shifted = [ImageSpan {
        start: 3,
        len: 4,
        hash: 111,
        ..Default::default()
    }];
    assert_eq!(
        bm.lookup(&hashes(&tokens, &shifted), &tokens, &shifted)
            .len(),
        0
    );
    // A different token in block 2 only: the chain stops there.
    let mut other = tokens.clone();
    other[9] = 42;
    assert_eq!(
        bm.lookup(&hashes(&other, &img(111)), &other, &img(111))
            .len(),
        2
    );
}

#[test]
fn hash_collision_never_returns_other_content() {
    let mut bm = BlockManager::new(4, BS, true);
    let mut blocks = Vec::new();
    bm.allocate(1, &mut blocks);
    bm.cache_block(blocks[0], None, 12345, &[1, 2, 3, 4], vec![]);
    // Same (forced) hash, different tokens or extra keys: no hit.
    assert!(bm.lookup(&[12345], &[1, 2, 3, 5], &[]).is_empty());
    let im = [ImageSpan {
        start: 0,
        len: 4,
        hash: 9,
        ..Default::default()
    }];
    assert!(bm.lookup(&[12345], &[1, 2, 3, 4], &im).is_empty());
    assert_eq!(bm.lookup(&[12345], &[1, 2, 3, 4], &[]), blocks);
}

#[test]
fn evicts_least_recently_freed_first() {
    let mut bm = BlockManager::new(4, BS, true);
    let a: Vec<u32> = (0..4).collect();
    let b: Vec<u32> = (10..14).collect();
    let c: Vec<u32> = (20..24).collect();
    let ba = prefill(&mut bm, &a, &[]);
    let bb = prefill(&mut bm, &b, &[]);
    let bc = prefill(&mut bm, &c, &[]);
    bm.free(&ba);
    bm.free(&bc);
    bm.free(&bb); // LRU order now: 1 uncached block, a, c, b
    let mut fresh = Vec::new();
    bm.allocate(2, &mut fresh); // the never-cached block, then a
    assert!(fresh.contains(&ba[0]));
    assert!(bm.lookup(&hashes(&a, &[]), &a, &[]).is_empty());
    assert_eq!(bm.lookup(&hashes(&b, &[]), &b, &[]), bb);
    // Touching c makes it in use; b is evicted next.
    let hit_c = bm.lookup(&hashes(&c, &[]), &c, &[]);
    bm.take_hits(&hit_c);
    bm.allocate(1, &mut fresh);
    assert!(bm.lookup(&hashes(&b, &[]), &b, &[]).is_empty());
    assert_eq!(bm.num_free(), 0);
    assert!(!bm.allocate(1, &mut fresh));
    bm.free(&fresh);
    bm.free(&hit_c);
    assert_eq!(bm.num_free(), 4);
}

#[test]
fn caching_disabled_never_hits() {
    let mut bm = BlockManager::new(8, BS, false);
    let t: Vec<u32> = (0..8).collect();
    let blocks = prefill(&mut bm, &t, &[]);
    bm.free(&blocks);
    assert!(bm.lookup(&hashes(&t, &[]), &t, &[]).is_empty());
    assert_eq!(bm.num_cached(), 0);
}

/// Random interleavings of prefills over shared prefixes and releases, checked against a shadow
/// count of owners per block.
#[test]
fn random_ops_keep_exact_ref_counts_and_leak_nothing() {
    let mut x = 7u64;
    let mut rnd = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    for _ in 0..20 {
        let n = 24;
        let mut bm = BlockManager::new(n, BS, true);
        let mut live: Vec<(Vec<u32>, Vec<u32>)> = Vec::new(); // (tokens, blocks)
        for _ in 0..300 {
            if live.is_empty() || rnd(3) > 0 {
                let prefix = rnd(4) as u32;
                let len = 1 + rnd(20) as usize;
                let tokens: Vec<u32> = (0..len)
                    .map(|i| {
                        if i < 8 {
                            prefix * 100 + i as u32
                        } else {
                            rnd(3) as u32
                        }
                    })
                    .collect();
                let h = hashes(&tokens, &[]);
                let hit = bm.lookup(&h, &tokens, &[]);
                for (i, &blk) in hit.iter().enumerate() {
                    // A hit holds exactly the tokens asked for.
                    assert!(live.iter().all(|(t, b)| b.get(i) != Some(&blk)
                        || t[..(i + 1) * BS] == tokens[..(i + 1) * BS]));
                }
                if bm.can_take(&hit, len.div_ceil(BS) - hit.len()) {
                    live.push((tokens.clone(), prefill(&mut bm, &tokens, &[])));
                }
            } else {
                let (_, blocks) = live.swap_remove(rnd(live.len() as u64) as usize);
                bm.free(&blocks);
            }
            let mut owners = vec![0u32; n];
            for (_, b) in &live {
                for &blk in b {
                    owners[blk as usize] += 1;
                }
            }
            for (id, &o) in owners.iter().enumerate() {
                assert_eq!(bm.ref_cnt(id as u32), o);
            }
            assert_eq!(bm.num_free(), owners.iter().filter(|&&o| o == 0).count());
        }
        for (_, b) in live.drain(..) {
            bm.free(&b);
        }
        assert_eq!(bm.num_free(), n);
    }
}
