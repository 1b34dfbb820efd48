//! What the bench runs on: the CPU's name and the SIMD features the kernels care about, from
//! `/proc/cpuinfo` (empty elsewhere). The bench's one place for CPU detection.

pub struct Machine {
    pub cpu: String,
    pub features: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| -> Option<String> {
            cpuinfo.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        let cpu = field("model name").unwrap_or_else(|| "unknown cpu".into());
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let features = [
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512_vnni",
            "avx_vnni",
            "amx_int8",
        ]
        .into_iter()
        .filter(|f| flags.contains(f))
        .collect::<Vec<_>>()
        .join(" ");
        Machine { cpu, features }
    }
}
