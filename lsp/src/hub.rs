//! Hugging Face Hub models (`--model microsoft/phi-1`): found in the standard cache that Python's
//! `huggingface_hub` writes (so a model downloaded there is reused), downloaded with progress when
//! missing, never downloaded when `HF_HUB_OFFLINE` is set.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A repository and revision, parsed from `owner/name` or `owner/name@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
}

fn safe_part(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && !part.contains("..")
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl HubModel {
    /// `None` for anything that is not a plain Hub id: ids name a cache folder, so `..`, absolute
    /// paths and odd characters are refused.
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (spec, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let revision_ok = revision.split('/').all(safe_part);
        (safe_part(owner) && safe_part(name) && revision_ok).then(|| HubModel {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    fn cache_folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }
}

/// Where and how the Hub is used: from the environment in production, explicit in tests.
#[derive(Debug, Clone)]
pub struct HubEnv {
    pub cache: PathBuf,
    pub offline: bool,
    pub endpoint: Option<String>,
    /// Draw a progress bar on stderr (the CLI); the server reports through its callback instead.
    pub progress_bar: bool,
}

impl HubEnv {
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    /// `~/.cache/huggingface/hub`, as `huggingface_hub` resolves it.
    pub fn from_env(progress_bar: bool) -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
            .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        HubEnv {
            cache,
            offline,
            endpoint: std::env::var("HF_ENDPOINT").ok(),
            progress_bar,
        }
    }
}

/// The snapshot folder of `model` if the cache has every file a model folder needs.
pub fn cached_snapshot(env: &HubEnv, model: &HubModel) -> Option<PathBuf> {
    let folder = model.cache_folder(&env.cache);
    let commit = if model.revision.len() == 40 && model.revision.chars().all(|c| c.is_ascii_hexdigit()) {
        model.revision.clone()
    } else {
        std::fs::read_to_string(folder.join("refs").join(&model.revision))
            .ok()?
            .trim()
            .to_string()
    };
    if !safe_part(&commit) {
        return None;
    }
    let snapshot = folder.join("snapshots").join(commit);
    let complete = snapshot.join("config.json").is_file()
        && snapshot.join("tokenizer.json").is_file()
        && (snapshot.join("model.safetensors").is_file() || index_complete(&snapshot));
    complete.then_some(snapshot)
}

fn index_complete(snapshot: &Path) -> bool {
    shard_names(&snapshot.join("model.safetensors.index.json"))
        .map(|names| names.iter().all(|n| snapshot.join(n).is_file()))
        .unwrap_or(false)
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("{}: cannot read it", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", index.display()))?;
    let mut names: Vec<String> = json["weight_map"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    names.sort();
    names.dedup();
    if let Some(bad) = names.iter().find(|n| !safe_part(n)) {
        bail!(
            "{}: shard {bad:?} is not a plain file name; refusing it",
            index.display()
        );
    }
    Ok(names)
}

/// Download progress: (file, bytes so far, total bytes).
pub type ProgressFn<'a> = &'a mut dyn FnMut(&str, u64, u64);

struct Reporter<'a> {
    report: &'a mut dyn FnMut(&str, u64, u64),
    file: String,
    done: u64,
    total: u64,
    last_percent: u64,
}

impl hf_hub::api::Progress for Reporter<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.file = filename.to_string();
        self.total = size as u64;
        (self.report)(&self.file, 0, self.total);
    }
    fn update(&mut self, size: usize) {
        self.done += size as u64;
        let percent = self.done * 100 / self.total.max(1);
        if percent != self.last_percent {
            self.last_percent = percent;
            (self.report)(&self.file, self.done, self.total);
        }
    }
    fn finish(&mut self) {
        (self.report)(&self.file, self.total, self.total);
    }
}

/// The local folder of `model`: from the cache, else downloaded into it (unless offline).
pub fn resolve(env: &HubEnv, model: &HubModel, progress: ProgressFn) -> Result<PathBuf> {
    if let Some(snapshot) = cached_snapshot(env, model) {
        return Ok(snapshot);
    }
    if env.offline {
        bail!(
            "{}@{} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set: download it first \
             (huggingface-cli download {}) or unset HF_HUB_OFFLINE",
            model.repo,
            model.revision,
            env.cache.display(),
            model.repo
        );
    }
    download(env, model, progress)
}

fn download(env: &HubEnv, model: &HubModel, progress: ProgressFn) -> Result<PathBuf> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(env.cache.clone()))
        .with_progress(env.progress_bar);
    if let Some(endpoint) = &env.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .context("cannot set up Hugging Face Hub downloads")?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        model.repo.clone(),
        hf_hub::RepoType::Model,
        model.revision.clone(),
    ));
    let mut fetch = |file: &str| -> Result<PathBuf> {
        let cached = hf_hub::Cache::new(env.cache.clone())
            .repo(hf_hub::Repo::with_revision(
                model.repo.clone(),
                hf_hub::RepoType::Model,
                model.revision.clone(),
            ))
            .get(file);
        if let Some(path) = cached {
            return Ok(path);
        }
        let result = if env.progress_bar {
            repo.download(file)
        } else {
            let reporter = Reporter {
                report: &mut *progress,
                file: file.to_string(),
                done: 0,
                total: 0,
                last_percent: 0,
            };
            repo.download_with_progress(file, reporter)
        };
        result.with_context(|| {
            format!(
                "cannot download {file} of {}@{} from the Hub",
                model.repo, model.revision
            )
        })
    };
    let config = fetch("config.json")?;
    fetch("tokenizer.json")?;
    match fetch("model.safetensors") {
        Ok(_) => {}
        Err(single) => {
            let index = fetch("model.safetensors.index.json").map_err(|_| single)?;
            for shard in shard_names(&index)? {
                fetch(&shard)?;
            }
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .context("the downloaded config.json has no folder")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_refuses_escapes() {
        assert_eq!(
            HubModel::parse("microsoft/phi-1"),
            Some(HubModel {
                repo: "microsoft/phi-1".into(),
                revision: "main".into()
            })
        );
        assert_eq!(
            HubModel::parse("microsoft/phi-1@refs/pr/3").map(|m| m.revision),
            Some("refs/pr/3".into())
        );
        for bad in [
            "phi-1",
            "../x/y",
            "a/../b",
            "/abs/path",
            "a/b/c",
            "a/b@../../x",
            "a/b@",
            "a b/c",
            "./m",
        ] {
            assert_eq!(HubModel::parse(bad), None, "{bad}");
        }
    }

    /// A cache laid out as the Hub lays it out: refs/main -> commit, snapshot files as symlinks
    /// into blobs/.
    fn fake_cache(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
        let repo = dir.join("models--microsoft--phi-1");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), commit).expect("ref");
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snapshot).expect("mkdir");
        std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
        for (i, (name, content)) in files.iter().enumerate() {
            let blob = repo.join("blobs").join(format!("blob{i}"));
            std::fs::write(&blob, content).expect("blob");
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(format!("blob{i}")),
                snapshot.join(name),
            )
            .expect("symlink");
        }
        snapshot
    }

    #[test]
    fn finds_a_complete_snapshot_and_stays_offline() {
        let dir = tempfile::tempdir().expect("temp");
        let model = HubModel::parse("microsoft/phi-1").expect("id");
        let env = HubEnv {
            cache: dir.path().to_path_buf(),
            offline: true,
            endpoint: None,
            progress_bar: false,
        };
        let snapshot = fake_cache(
            dir.path(),
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("model.safetensors", "x"),
            ],
        );
        assert_eq!(cached_snapshot(&env, &model), Some(snapshot.clone()));
        assert_eq!(
            resolve(&env, &model, &mut |_, _, _| {}).expect("cached"),
            snapshot
        );
        // By commit hash too.
        let by_commit = HubModel {
            revision: "0123456789abcdef0123456789abcdef01234567".into(),
            ..model.clone()
        };
        assert_eq!(cached_snapshot(&env, &by_commit), Some(snapshot));
        // Another revision is not there, and offline means no download.
        let other = HubModel {
            revision: "v2".into(),
            ..model
        };
        let err = resolve(&env, &other, &mut |_, _, _| {}).expect_err("offline");
        assert!(format!("{err}").contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn an_incomplete_snapshot_is_not_used() {
        let dir = tempfile::tempdir().expect("temp");
        let model = HubModel::parse("microsoft/phi-1").expect("id");
        let env = HubEnv {
            cache: dir.path().to_path_buf(),
            offline: true,
            endpoint: None,
            progress_bar: false,
        };
        fake_cache(
            dir.path(),
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (
                    "model.safetensors.index.json",
                    r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
                ),
            ],
        );
        assert_eq!(cached_snapshot(&env, &model), None);
    }

    #[test]
    fn a_refused_connection_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().expect("temp");
        let model = HubModel::parse("microsoft/phi-1").expect("id");
        // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        let env = HubEnv {
            cache: dir.path().to_path_buf(),
            offline: false,
            endpoint: Some("http://127.0.0.1:9".into()),
            progress_bar: false,
        };
        let err = resolve(&env, &model, &mut |_, _, _| {}).expect_err("no server");
        assert!(
            format!("{err:#}").contains("cannot download config.json"),
            "{err:#}"
        );
    }
}
