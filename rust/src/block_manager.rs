//! Paged KV blocks: ref counts, an LRU free queue that keeps freed blocks' cached content until
//! they are reused, and a prefix cache keyed by chained hashes of full blocks (vLLM v1 style).

use std::hash::{Hash, Hasher};

use rustc_hash::FxHashMap;

const NONE: u32 = u32::MAX;

/// A run of a sequence's tokens that take image embeddings: tokens `start..start + len` take
/// embeddings `offset..offset + len` of the image whose content hash is `hash`. One image may have
/// several runs (Idefics3 puts row/column tokens between its tiles). An `atomic` run is never split
/// across prefill chunks (Gemma 3's image tokens attend to each other bidirectionally).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageSpan {
    pub start: usize,
    pub len: usize,
    pub hash: u64,
    pub offset: usize,
    pub atomic: bool,
}

impl ImageSpan {
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

/// The extra keys of block `idx`: (content hash, embedding index at the block's first token) of
/// every image run that overlaps the block. Placeholder ids alone do not identify an image.
pub fn extra_keys(images: &[ImageSpan], idx: usize, block_size: usize) -> Vec<(u64, i64)> {
    let (lo, hi) = (idx * block_size, (idx + 1) * block_size);
    images
        .iter()
        .filter(|im| im.start < hi && im.end() > lo)
        .map(|im| (im.hash, im.offset as i64 + lo as i64 - im.start as i64))
        .collect()
}

/// hash(parent hash, token ids, extra keys): equal hashes of block i imply (up to collisions,
/// which `lookup` rules out by comparing contents) equal sequences up to block i.
pub fn hash_block(parent: u64, tokens: &[u32], extra: &[(u64, i64)]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (parent, tokens, extra).hash(&mut h);
    h.finish()
}

/// What a cached block holds, compared on every hash hit.
#[derive(Default, PartialEq)]
struct BlockKey {
    parent: u32,
    tokens: Vec<u32>,
    extra: Vec<(u64, i64)>,
}

#[derive(Default)]
struct Block {
    ref_cnt: u32,
    hash: Option<u64>, // Some while the block is in the prefix cache
    key: BlockKey,
    prev: u32, // free-queue links
    next: u32,
    free: bool,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    head: u32, // next block to reuse (least recently freed)
    tail: u32,
    num_free: usize,
    cache: FxHashMap<u64, u32>,
    enable_caching: bool,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> Self {
        assert!(num_blocks > 0 && num_blocks < NONE as usize && block_size > 0);
        let mut bm = Self {
            block_size,
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            head: NONE,
            tail: NONE,
            num_free: 0,
            cache: FxHashMap::default(),
            enable_caching,
        };
        for id in 0..num_blocks as u32 {
            bm.push_back(id);
        }
        bm
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Blocks with no owner, including cached ones that can still be hit.
    pub fn num_free(&self) -> usize {
        self.num_free
    }
    pub fn num_cached(&self) -> usize {
        self.cache.len()
    }
    pub fn ref_cnt(&self, id: u32) -> u32 {
        self.blocks[id as usize].ref_cnt
    }
    pub fn is_cached(&self, id: u32) -> bool {
        self.blocks[id as usize].hash.is_some()
    }
    pub fn caching_enabled(&self) -> bool {
        self.enable_caching
    }

    /// Longest chain of cached blocks matching `hashes` (one per full block of `tokens`).
    pub fn lookup(&self, hashes: &[u64], tokens: &[u32], images: &[ImageSpan]) -> Vec<u32> {
        let bs = self.block_size;
        let mut hit = Vec::new();
        let mut parent = NONE;
        for (i, h) in hashes.iter().enumerate() {
            let Some(&id) = self.cache.get(h) else { break };
            let key = &self.blocks[id as usize].key;
            if key.parent != parent
                || key.tokens[..] != tokens[i * bs..(i + 1) * bs]
                || key.extra != extra_keys(images, i, bs)
            {
                break;
            }
            hit.push(id);
            parent = id;
        }
        hit
    }

    /// Whether `hit` (from `lookup`) plus `n` new blocks can be taken now.
    pub fn can_take(&self, hit: &[u32], n: usize) -> bool {
        let idle_hits = hit
            .iter()
            .filter(|&&id| self.blocks[id as usize].ref_cnt == 0)
            .count();
        idle_hits + n <= self.num_free
    }

    /// Shares the cached blocks `hit`.
    pub fn take_hits(&mut self, hit: &[u32]) {
        for &id in hit {
            if self.blocks[id as usize].ref_cnt == 0 {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
        }
    }

    /// Appends `n` fresh blocks to `out`, evicting least recently freed cached blocks; false if short.
    pub fn allocate(&mut self, n: usize, out: &mut Vec<u32>) -> bool {
        if n > self.num_free {
            return false;
        }
        for _ in 0..n {
            let id = self.head;
            self.unlink(id);
            let b = &mut self.blocks[id as usize];
            if let Some(h) = b.hash.take() {
                self.cache.remove(&h);
                b.key = BlockKey::default();
            }
            b.ref_cnt = 1;
            out.push(id);
        }
        true
    }

    /// Releases a sequence's blocks. Its last blocks are freed first so they are evicted first:
    /// a block's prefix-cache children then always leave the cache before it does.
    pub fn free(&mut self, blocks: &[u32]) {
        for &id in blocks.iter().rev() {
            let b = &mut self.blocks[id as usize];
            assert!(b.ref_cnt > 0, "double free of block {id}");
            b.ref_cnt -= 1;
            if b.ref_cnt == 0 {
                if b.hash.is_some() {
                    self.push_back(id);
                } else {
                    self.push_front(id); // nothing worth keeping: reuse it first
                }
            }
        }
    }

    /// Enters full block `id` (parent `parent`, or None for a sequence's first block) into
    /// the prefix cache. Skipped when the hash is taken (a duplicate or a collision) or the parent
    /// is not cached, so a cached block's parent is always the cached block it was computed after.
    /// Returns whether it was cached.
    pub fn cache_block(
        &mut self,
        id: u32,
        parent: Option<u32>,
        hash: u64,
        tokens: &[u32],
        extra: Vec<(u64, i64)>,
    ) -> bool {
        if !self.enable_caching
            || self.cache.contains_key(&hash)
            || parent.is_some_and(|p| self.blocks[p as usize].hash.is_none())
        {
            return false;
        }
        self.cache.insert(hash, id);
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.hash.is_none() && b.ref_cnt > 0);
        b.hash = Some(hash);
        b.key = BlockKey {
            parent: parent.unwrap_or(NONE),
            tokens: tokens.to_vec(),
            extra,
        };
        true
    }

    /// Takes block `id` out of the prefix cache (its KV will not be written after all). Callers
    /// uncache a block's cached children with it.
    pub fn uncache(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        if let Some(h) = b.hash.take() {
            self.cache.remove(&h);
            b.key = BlockKey::default();
            if b.free {
                self.unlink(id);
                self.push_front(id);
            }
        }
    }

    fn push_back(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        (b.prev, b.next, b.free) = (self.tail, NONE, true);
        match self.tail {
            NONE => self.head = id,
            t => self.blocks[t as usize].next = id,
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn push_front(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        (b.prev, b.next, b.free) = (NONE, self.head, true);
        match self.head {
            NONE => self.tail = id,
            h => self.blocks[h as usize].prev = id,
        }
        self.head = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.free);
        let (prev, next) = (b.prev, b.next);
        b.free = false;
        match prev {
            NONE => self.head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NONE => self.tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        self.num_free -= 1;
    }
}
