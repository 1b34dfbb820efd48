//! Random weights of an exact shape (being written).

use candle_core::Device;

use crate::config::PhiConfig;
use crate::error::{EngineError, Result};
use crate::model::PhiModel;
use crate::weights::WeightDType;

/// A model of `cfg`'s exact shape with random weights from `seed`: it costs the same to run as
/// the real one, for benchmarks.
pub fn model(cfg: &PhiConfig, dtype: WeightDType, device: &Device, seed: u64) -> Result<PhiModel> {
    let _ = (cfg, dtype, device, seed);
    Err(EngineError::Request("synthetic weights are being written".into()))
}
