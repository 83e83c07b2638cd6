//! Per-request KV caches: one growable key/value buffer per layer, all requests' caches
//! held within a memory budget, least recently used evicted first.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// Keys and values of one layer, `[batch, kv_heads, capacity, width]` (keys and values may
/// differ in width: DeepSeek's latent cache holds a rope key and a latent), valid up to `len`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

impl LayerCache {
    /// A cache holding `keys` and `values` (`[batch, kv_heads, seq, head_dim]`) as its first entries.
    fn with_capacity(keys: &Tensor, values: &Tensor, capacity: usize) -> Result<Self> {
        let (b, h, seq, d) = keys.dims4()?;
        let (vb, vh, _, vd) = values.dims4()?;
        let capacity = capacity.max(seq);
        let cache = Self {
            keys: Tensor::zeros((b, h, capacity, d), keys.dtype(), keys.device())?,
            values: Tensor::zeros((vb, vh, capacity, vd), values.dtype(), values.device())?,
            len: 0,
        };
        // A view of a part-filled cache (when it grows) is not contiguous; slice_set needs it so.
        cache.keys.slice_set(&keys.contiguous()?, 2, 0)?;
        cache.values.slice_set(&values.contiguous()?, 2, 0)?;
        Ok(Self { len: seq, ..cache })
    }

    /// Appends `keys`/`values` and returns everything cached so far, growing the buffers
    /// (doubling) when full.
    pub fn append(&mut self, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq = keys.dim(2)?;
        let capacity = self.keys.dim(2)?;
        if self.len + seq > capacity {
            let grown = Self::with_capacity(
                &self.valid_keys()?,
                &self.valid_values()?,
                (self.len + seq).max(2 * capacity),
            )?;
            *self = grown;
        }
        self.keys.slice_set(&keys.contiguous()?, 2, self.len)?;
        self.values.slice_set(&values.contiguous()?, 2, self.len)?;
        self.len += seq;
        Ok((self.valid_keys()?, self.valid_values()?))
    }

    fn valid_keys(&self) -> Result<Tensor> {
        Ok(self.keys.narrow(2, 0, self.len)?)
    }

    fn valid_values(&self) -> Result<Tensor> {
        Ok(self.values.narrow(2, 0, self.len)?)
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.keys.elem_count() * self.keys.dtype().size_in_bytes()
            + self.values.elem_count() * self.values.dtype().size_in_bytes()
    }
}

/// Everything the engine keeps for one request: a cache per local layer and the next position.
#[derive(Debug, Default)]
pub struct RequestCache {
    layers: Vec<Option<LayerCache>>,
    /// Position of the next token (tokens seen so far).
    pub position: usize,
    /// While a step runs in chunks, the position after its last one (else 0): LongRoPE picks
    /// its factors by where the whole step ends, as one pass would.
    pub step_end: usize,
}

impl RequestCache {
    /// An empty cache for `layers` local layers.
    pub fn new(layers: usize) -> Self {
        Self { layers: vec![None; layers], position: 0, step_end: 0 }
    }

    /// Appends to local layer `layer` and returns its keys and values so far.
    pub fn append(&mut self, layer: usize, keys: &Tensor, values: &Tensor) -> Result<(Tensor, Tensor)> {
        match &mut self.layers[layer] {
            Some(cache) => cache.append(keys, values),
            slot @ None => {
                let capacity = keys.dim(2)?.next_power_of_two().max(64);
                let cache = slot.insert(LayerCache::with_capacity(keys, values, capacity)?);
                Ok((cache.valid_keys()?, cache.valid_values()?))
            }
        }
    }

    /// Bytes held by all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(LayerCache::bytes).sum()
    }
}

/// All requests' caches within a byte budget. A request's cache is checked out while it
/// computes and checked back in afterwards; eviction only touches checked-in caches.
#[derive(Debug)]
pub struct CacheStore {
    budget_bytes: usize,
    idle: HashMap<String, (RequestCache, Instant)>,
    busy: HashMap<String, usize>,
    evicted: HashSet<String>,
}

impl CacheStore {
    /// A store that keeps at most `budget_bytes` of caches.
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget_bytes, idle: HashMap::new(), busy: HashMap::new(), evicted: HashSet::new() }
    }

    /// Takes `request_id`'s cache for a step: the one its earlier steps built, or a fresh one
    /// for a request not seen before; an evicted request gets an error instead.
    pub fn check_out(&mut self, request_id: &str, layers: usize) -> Result<RequestCache> {
        if self.busy.contains_key(request_id) {
            return Err(Error::InvalidArgument(format!("request {request_id} is already running a step")));
        }
        let cache = if let Some((cache, _)) = self.idle.remove(request_id) {
            cache
        } else if self.evicted.remove(request_id) {
            return Err(Error::CacheEvicted(format!(
                "the KV cache of request {request_id} was evicted to stay within the {} MiB cache budget",
                self.budget_bytes >> 20
            )));
        } else {
            RequestCache::new(layers)
        };
        self.busy.insert(request_id.to_string(), cache.bytes());
        Ok(cache)
    }

    /// Returns a cache after a step, evicting least recently used idle caches until the
    /// total fits the budget. A cache larger than the whole budget is itself dropped.
    pub fn check_in(&mut self, request_id: &str, cache: RequestCache) {
        self.busy.remove(request_id);
        if cache.bytes() > self.budget_bytes {
            self.evicted.insert(request_id.to_string());
            return;
        }
        self.idle.insert(request_id.to_string(), (cache, Instant::now()));
        while self.total_bytes() > self.budget_bytes {
            let Some(oldest) = self.idle.iter().min_by_key(|(_, (_, used))| *used).map(|(id, _)| id.clone())
            else {
                break;
            };
            self.idle.remove(&oldest);
            self.evicted.insert(oldest);
        }
    }

    /// Forgets a request entirely (it finished).
    pub fn finish(&mut self, request_id: &str) {
        self.idle.remove(request_id);
        self.evicted.remove(request_id);
    }

    /// Positions `request_id`'s idle cache holds (`None` while running a step or unknown).
    pub fn position(&self, request_id: &str) -> Option<usize> {
        self.idle.get(request_id).map(|(cache, _)| cache.position)
    }

    /// Bytes held by idle and running caches.
    pub fn total_bytes(&self) -> usize {
        self.idle.values().map(|(c, _)| c.bytes()).sum::<usize>() + self.busy.values().sum::<usize>()
    }

    /// Number of requests with a cache.
    pub fn requests(&self) -> usize {
        self.idle.len() + self.busy.len()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn kv(seq: usize, value: f32) -> Tensor {
        Tensor::full(value, (1, 2, seq, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn append_grows_and_keeps_order() {
        let mut cache = RequestCache::new(1);
        cache.append(0, &kv(3, 1.0), &kv(3, 1.0)).unwrap();
        for step in 0..70 {
            let (k, _) = cache.append(0, &kv(1, step as f32), &kv(1, 0.0)).unwrap();
            assert_eq!(k.dim(2).unwrap(), 4 + step);
        }
        let (k, _) = cache.append(0, &kv(1, 99.0), &kv(1, 0.0)).unwrap();
        let column: Vec<f32> =
            k.narrow(1, 0, 1).unwrap().narrow(3, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&column[..4], &[1.0, 1.0, 1.0, 0.0]);
        assert_eq!(column[72], 69.0);
        assert_eq!(column[73], 99.0);
    }

    #[test]
    fn a_part_filled_cache_grows_by_several_positions() {
        let mut cache = RequestCache::new(1);
        cache.append(0, &kv(60, 1.0), &kv(60, 1.0)).unwrap();
        let (k, v) = cache.append(0, &kv(5, 2.0), &kv(5, 3.0)).unwrap();
        assert_eq!(k.dim(2).unwrap(), 65);
        let last: Vec<f32> = v.narrow(2, 60, 5).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(last.iter().all(|&x| x == 3.0));
        let first: f32 = k.narrow(2, 59, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(first, 1.0);
    }

    #[test]
    fn keys_and_values_may_differ_in_width() {
        let mut cache = RequestCache::new(1);
        let latent = |seq| Tensor::full(2f32, (1, 1, seq, 32), &Device::Cpu).unwrap();
        let rope_key = |seq| Tensor::full(1f32, (1, 1, seq, 8), &Device::Cpu).unwrap();
        cache.append(0, &rope_key(3), &latent(3)).unwrap();
        let (k, v) = cache.append(0, &rope_key(70), &latent(70)).unwrap();
        assert_eq!((k.dims4().unwrap(), v.dims4().unwrap()), ((1, 1, 73, 8), (1, 1, 73, 32)));
        // Room for 128 positions: 40 values each.
        assert_eq!(cache.bytes(), 128 * 40 * 4);
    }

    #[test]
    fn least_recently_used_is_evicted_with_a_clear_error() {
        let one = {
            let mut c = RequestCache::new(1);
            c.append(0, &kv(1, 0.0), &kv(1, 0.0)).unwrap();
            c.bytes()
        };
        let mut store = CacheStore::new(2 * one);
        for id in ["a", "b", "c"] {
            let mut cache = store.check_out(id, 1).unwrap();
            cache.append(0, &kv(1, 0.0), &kv(1, 0.0)).unwrap();
            store.check_in(id, cache);
        }
        assert_eq!(store.requests(), 2);
        let err = store.check_out("a", 1).unwrap_err();
        assert!(matches!(err, Error::CacheEvicted(_)), "{err}");
        assert!(store.check_out("b", 1).is_ok());
        assert!(store.check_out("b", 1).is_err(), "a running request cannot step twice");
    }

    #[test]
    fn finish_frees_the_cache() {
        let mut store = CacheStore::new(1 << 20);
        let mut cache = store.check_out("r", 1).unwrap();
        cache.append(0, &kv(2, 0.0), &kv(2, 0.0)).unwrap();
        store.check_in("r", cache);
        assert!(store.total_bytes() > 0);
        store.finish("r");
        assert_eq!(store.total_bytes(), 0);
        assert_eq!(store.requests(), 0);
    }
}
