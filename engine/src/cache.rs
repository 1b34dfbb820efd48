//! The prefix-reusable KV cache. K is stored after RoPE at its absolute position, so any prefix of
//! the cache is exactly what a fresh forward over that prefix would compute: truncating is just
//! setting the length.

use candle_core::{DType, Device, Tensor};

use crate::config::PhiConfig;
use crate::error::{EngineError, Result};

struct LayerCache {
    /// `[1, kv_heads, capacity, head_dim]`, preallocated; positions `len..` are garbage.
    k: Tensor,
    v: Tensor,
}

pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Buffers are zero-filled allocations, which the OS maps lazily: resident memory grows with
    /// the positions actually written, not with `capacity`.
    pub fn new(cfg: &PhiConfig, capacity: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape = (1, cfg.num_kv_heads(), capacity, cfg.head_dim());
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok(LayerCache {
                    k: Tensor::zeros(shape, dtype, device)?,
                    v: Tensor::zeros(shape, dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// O(1): later positions are overwritten by the next append.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn check_room(&self, n_new: usize) -> Result<()> {
        if self.len + n_new > self.capacity {
            return Err(EngineError::Request(format!(
                "{} cached + {n_new} new positions exceed the context of {}",
                self.len, self.capacity
            )));
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[1, kv_heads, n_new, head_dim]`, converted to the cache's dtype) for
    /// `layer_idx` at the current length and returns views of all positions so far. The length
    /// moves only in [`Self::advance`], once every layer has appended.
    pub(crate) fn append(&self, layer_idx: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let layer = &self.layers[layer_idx];
        let n_new = k.dim(2)?;
        let dtype = layer.k.dtype();
        layer
            .k
            .slice_set(&k.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
        layer
            .v
            .slice_set(&v.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
        let total = self.len + n_new;
        Ok((layer.k.narrow(2, 0, total)?, layer.v.narrow(2, 0, total)?))
    }

    pub(crate) fn advance(&mut self, n_new: usize) {
        self.len += n_new;
    }
}
