//! The whole server in process, fed hostile protocol input: after a valid `initialize`, the input
//! is a sequence of frames that are well-formed JSON-RPC with arbitrary params (wrong types, ranges
//! past the end or inverted, unknown documents, stale versions), bodies whose `Content-Length` is
//! wrong, or raw bytes (bad headers, invalid UTF-8, truncated or huge lengths). The server runs the
//! committed tiny model, so completions reach the model. Each input must end with the server
//! stopped at `exit` or the end of input, within a bound: a panic anywhere (libFuzzer's hook sees
//! panics the server's guards catch) or a hang is a finding.

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phi_lsp::settings::{ModelSpec, Settings};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METHODS: &[&str] = &[
    "textDocument/didOpen",
    "textDocument/didChange",
    "textDocument/didClose",
    "textDocument/inlineCompletion",
    "textDocument/completion",
    "workspace/didChangeConfiguration",
    "$/cancelRequest",
    "phi-lsp/status",
    "initialize",
    "initialized",
    "shutdown",
    "exit",
    "textDocument/hover",
];

/// Keys the server's params use, so mutations can build (and break) real shapes.
const KEYS: &[&str] = &[
    "textDocument",
    "uri",
    "version",
    "text",
    "languageId",
    "contentChanges",
    "range",
    "start",
    "end",
    "line",
    "character",
    "position",
    "context",
    "triggerKind",
    "settings",
    "phi-lsp",
    "maxNewTokens",
    "deadlineMs",
    "contextTokens",
    "completionMode",
    "model",
    "id",
    "x",
];

#[derive(Arbitrary, Debug)]
enum V {
    Null,
    Bool(bool),
    Small(u8),
    Int(i64),
    Float(f64),
    Str(String),
    Uri(u8),
    Arr(Vec<V>),
    Obj(Vec<(u8, V)>),
}

impl V {
    fn json(&self, depth: usize) -> Value {
        if depth > 6 {
            return Value::Null;
        }
        match self {
            V::Null => Value::Null,
            V::Bool(b) => json!(b),
            V::Small(n) => json!(n),
            V::Int(n) => json!(n),
            V::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            V::Str(s) => json!(s),
            V::Uri(n) => json!(uri(*n)),
            V::Arr(items) => Value::Array(items.iter().map(|v| v.json(depth + 1)).collect()),
            V::Obj(fields) => {
                let mut map = Map::new();
                for (key, value) in fields {
                    map.insert(KEYS[*key as usize % KEYS.len()].into(), value.json(depth + 1));
                }
                Value::Object(map)
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Frame {
    /// A JSON-RPC message, framed correctly.
    Message {
        method: u8,
        id: Option<i16>,
        params: Option<V>,
    },
    /// A body under a `Content-Length` off by `delta`.
    BadLength { body: Vec<u8>, delta: i8 },
    /// Bytes as they are.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// utf-8, utf-16, or none offered (utf-16).
    encoding: u8,
    inline: bool,
    /// Send the frames once the model is ready (so completions run it), else at once (so they
    /// race the load).
    wait_ready: bool,
    text: String,
    frames: Vec<Frame>,
}

fn uri(n: u8) -> String {
    format!("file:///fuzz/{}.py", n % 3)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

fn message(id: Option<i64>, method: &str, params: Value) -> Vec<u8> {
    let mut body = json!({"jsonrpc": "2.0", "method": method, "params": params});
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    framed(body.to_string().as_bytes())
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        // A model id in the input must never reach the network.
        std::env::set_var("HF_HUB_OFFLINE", "1");
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|input: Input| {
    let encodings = match input.encoding % 3 {
        0 => json!(["utf-8", "utf-16"]),
        1 => json!(["utf-16"]),
        _ => Value::Null,
    };
    let inline = if input.inline { json!({}) } else { Value::Null };
    // The spec lets a client send nothing more before the initialize result (tower-lsp-server
    // drops what comes earlier), so the harness waits for it.
    let initialize = message(
        Some(0),
        "initialize",
        json!({"capabilities": {"general": {"positionEncodings": encodings},
                                "textDocument": {"inlineCompletion": inline}}}),
    );
    let mut bytes = message(None, "initialized", json!({}));
    bytes.extend(message(
        None,
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri(0), "languageId": "python", "version": 1,
                                "text": input.text}}),
    ));
    let mut rest = Vec::new();
    for frame in &input.frames {
        match frame {
            Frame::Message { method, id, params } => {
                let method = METHODS[*method as usize % METHODS.len()];
                let params = params.as_ref().map_or(Value::Null, |p| p.json(0));
                rest.extend(message(id.map(i64::from), method, params));
            }
            Frame::BadLength { body, delta } => {
                let length = (body.len() as i64 + i64::from(*delta)).max(0);
                rest.extend(format!("Content-Length: {length}\r\n\r\n").into_bytes());
                rest.extend(body);
            }
            Frame::Raw(raw) => rest.extend(raw),
        }
    }
    rest.extend(message(Some(1_000_000), "shutdown", Value::Null));
    rest.extend(message(None, "exit", Value::Null));

    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-phi");
    let mut settings = Settings::new(ModelSpec {
        model: fixture.into(),
        tokenizer: None,
        device: "cpu".into(),
        dtype: "f32".into(),
        backend: "local".into(),
    });
    settings.max_new_tokens = 4;
    let wait_ready = input.wait_ready;
    runtime().block_on(async move {
        let (mut client_in, server_in) = tokio::io::duplex(1 << 16);
        let (server_out, client_out) = tokio::io::duplex(1 << 16);
        let serve = phi_lsp::transport::serve(server_in, server_out, settings);
        let client = async move {
            // The server's output: drained throughout, watched for the initialize result and the
            // model's "ready".
            let (answered_tx, answered_rx) = tokio::sync::oneshot::channel();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(drain(client_out, answered_tx, ready_tx));
            client_in.write_all(&initialize).await.expect("server input");
            let answered = tokio::time::timeout(Duration::from_secs(10), answered_rx).await;
            assert!(matches!(answered, Ok(Ok(()))), "no initialize result within 10 s");
            client_in.write_all(&bytes).await.expect("server input");
            if wait_ready
                && tokio::time::timeout(Duration::from_secs(10), ready_rx)
                    .await
                    .is_err()
            {
                panic!("the fixture model was not ready within 10 s");
            }
            // The server may stop before reading it all (an `exit` in the frames). Closing the
            // input ends the session where a bad length swallowed the closing `exit`.
            let _ = client_in.write_all(&rest).await;
        };
        let run = async { tokio::join!(serve, client) };
        if tokio::time::timeout(Duration::from_secs(20), run).await.is_err() {
            panic!("the server did not stop within 20 s");
        }
    });
});

/// Reads the server's output to its end; says when it first answers and when the model is ready.
async fn drain(
    mut output: tokio::io::DuplexStream,
    answered: tokio::sync::oneshot::Sender<()>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    // The server writes nothing before the initialize result.
    let mut answered = Some(answered);
    let mut ready = Some(ready);
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = output.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if let Some(answered) = answered.take() {
            let _ = answered.send(());
        }
        if ready.is_some() {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(14).any(|w| w == b"phi-lsp: ready") {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                seen.clear();
            }
        }
    }
}
