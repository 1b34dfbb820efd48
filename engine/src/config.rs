//! `PhiConfig`: field for field the Hugging Face `config.json` of a `PhiForCausalLM`, in both the
//! top-level layout (transformers 4) and the nested `rope_parameters` layout (transformers 5).

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

/// transformers 5 moves `rope_theta` and `partial_rotary_factor` under this key.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `null` in Phi-1's file: the same as `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub qk_layernorm: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_act() -> String {
    "gelu_new".to_string()
}
fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-5
}

impl PhiConfig {
    /// Microsoft's published `config.json` for phi-1, for tables and synthetic benchmarks.
    pub fn phi_1() -> Self {
        PhiConfig {
            vocab_size: 51200,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_hidden_layers: 24,
            num_attention_heads: 32,
            num_key_value_heads: None,
            hidden_act: default_act(),
            max_position_embeddings: 2048,
            layer_norm_eps: 1e-5,
            rope_theta: Some(10000.0),
            partial_rotary_factor: Some(0.5),
            rope_parameters: None,
            rope_scaling: None,
            qk_layernorm: false,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let cfg: PhiConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::Load {
            path: path.to_path_buf(),
            message: format!("cannot read it ({e}): pass a Hugging Face model folder that has config.json"),
        })?;
        Self::from_json(&text).map_err(|message| EngineError::Load {
            path: path.to_path_buf(),
            message: format!("not a usable Phi config: {message}"),
        })
    }

    /// Checks what this implementation supports, so a wrong file fails here and not mid-forward.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let heads = self.num_attention_heads;
        if heads == 0 || self.hidden_size == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            ));
        }
        if self.num_kv_heads() != heads {
            return Err(format!(
                "num_key_value_heads {} differs from num_attention_heads {heads}; Phi-1 uses full attention",
                self.num_kv_heads()
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
            return Err(format!(
                "hidden_act {:?} is not supported (Phi-1 uses gelu_new)",
                self.hidden_act
            ));
        }
        if self.qk_layernorm {
            return Err("qk_layernorm is not supported (Phi-1 does not use it)".into());
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported (Phi-1 has none)".into());
        }
        if let Some(kind) = self.rope_parameters.as_ref().and_then(|p| p.rope_type.as_deref()) {
            if kind != "default" {
                return Err(format!(
                    "rope_type {kind:?} is not supported (Phi-1 uses default)"
                ));
            }
        }
        let factor = self.partial_rotary_factor();
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(format!("partial_rotary_factor {factor} is outside (0, 1]"));
        }
        let rotary = self.rotary_dim();
        if rotary == 0 || !rotary.is_multiple_of(2) {
            return Err(format!("rotary dimension {rotary} must be even and non-zero"));
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return Err("vocab_size, num_hidden_layers and intermediate_size must be non-zero".into());
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    pub fn partial_rotary_factor(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(0.5)
    }

    /// transformers computes `int(partial_rotary_factor * head_dim)`.
    pub fn rotary_dim(&self) -> usize {
        (self.partial_rotary_factor() * self.head_dim() as f64) as usize
    }

    /// Parameters in the checkpoint (embedding, layers, final norm, lm_head).
    pub fn n_params(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * h;
        v * h + self.num_hidden_layers as u64 * layer + 2 * h + v * h + v
    }

    /// Bytes of K and V for one cached position across all layers, at `bytes_per_value`.
    pub fn kv_bytes_per_token(&self, bytes_per_value: usize) -> u64 {
        (2 * self.num_hidden_layers * self.num_kv_heads() * self.head_dim() * bytes_per_value) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP_LEVEL: &str = r#"{"vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": null,
        "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-05,
        "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_scaling": null,
        "qk_layernorm": false, "tie_word_embeddings": false, "bos_token_id": null, "eos_token_id": null}"#;

    const NESTED: &str = r#"{"vocab_size": 1088, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "hidden_act": "gelu_new", "max_position_embeddings": 512, "layer_norm_eps": 1e-05,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}"#;

    #[test]
    fn reads_top_level_layout() {
        let cfg = PhiConfig::from_json(TOP_LEVEL).expect("phi-1 config parses");
        assert_eq!(cfg, PhiConfig::phi_1());
        assert_eq!(cfg.head_dim(), 64);
        assert_eq!(cfg.rotary_dim(), 32);
        assert_eq!(cfg.rope_theta(), 10000.0);
        assert_eq!(cfg.n_params(), 1_418_270_720);
        assert_eq!(cfg.kv_bytes_per_token(4), 384 * 1024);
    }

    #[test]
    fn reads_nested_rope_parameters() {
        let cfg = PhiConfig::from_json(NESTED).expect("nested config parses");
        assert_eq!(cfg.rope_theta(), 500.0);
        assert_eq!(cfg.partial_rotary_factor(), 0.25);
        assert_eq!(cfg.rotary_dim(), 4);
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let bad = TOP_LEVEL.replace("\"num_attention_heads\": 32", "\"num_attention_heads\": 30");
        assert!(PhiConfig::from_json(&bad)
            .expect_err("rejected")
            .contains("multiple"));
        let bad = TOP_LEVEL.replace("\"qk_layernorm\": false", "\"qk_layernorm\": true");
        assert!(PhiConfig::from_json(&bad)
            .expect_err("rejected")
            .contains("qk_layernorm"));
        assert!(PhiConfig::from_json("{}").is_err());
    }

    #[test]
    fn real_phi_1_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/phi-1/config.json");
        let cfg = PhiConfig::from_file(&path).expect("real config parses");
        assert_eq!(cfg, PhiConfig::phi_1());
    }
}
