//! Lenient parameters for the server's own methods. tower-lsp-server's router takes a method
//! without parameters only when `params` is absent or `null` (`{}` is "Unexpected params",
//! -32602), and a method with parameters only when `params` is there. Clients commonly send `{}`,
//! `[]` or `null` for a request without parameters, so this layer, in front of the router, gives
//! each custom method the shape its handler takes.

use std::task::{Context, Poll};

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::Request;
use tower_service::Service;

/// What a custom method's handler takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Nothing: `{}`, `[]` and `null` become absent.
    Nothing,
    /// An object: absent and `null` become `{}`.
    Object,
}

/// The server's custom methods (`server::service` registers them) that take no parameters or an
/// object of optional fields. `textDocument/inlineCompletion` is not here: it needs its params.
fn shape(method: &str) -> Option<Shape> {
    match method {
        crate::status::METHOD => Some(Shape::Nothing),
        crate::framing::MALFORMED_METHOD => Some(Shape::Object),
        _ => None,
    }
}

/// `request` with its params in the shape its handler takes; other methods pass unchanged.
pub fn normalize(request: Request) -> Request {
    let Some(shape) = shape(request.method()) else {
        return request;
    };
    let (method, id, params) = request.into_parts();
    let params = match (shape, params) {
        (Shape::Nothing, Some(Value::Null)) => None,
        (Shape::Nothing, Some(Value::Object(map))) if map.is_empty() => None,
        (Shape::Nothing, Some(Value::Array(list))) if list.is_empty() => None,
        (Shape::Object, None | Some(Value::Null)) => Some(json!({})),
        (_, params) => params,
    };
    let mut builder = Request::build(method);
    if let Some(id) = id {
        builder = builder.id(id);
    }
    if let Some(params) = params {
        builder = builder.params(params);
    }
    builder.finish()
}

/// A service that normalizes each request's params (see [`normalize`]) before `S` sees it.
pub struct LenientParams<S>(pub S);

impl<S: Service<Request>> Service<Request> for LenientParams<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.0.call(normalize(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, params: Option<Value>) -> Request {
        let mut builder = Request::build(method.to_string()).id(7);
        if let Some(params) = params {
            builder = builder.params(params);
        }
        builder.finish()
    }

    fn params_after(method: &str, params: Option<Value>) -> Option<Value> {
        normalize(request(method, params)).into_parts().2
    }

    #[test]
    fn status_takes_empty_object_array_null_and_nothing() {
        for params in [Some(json!({})), Some(json!([])), Some(Value::Null), None] {
            assert_eq!(params_after("phi-lsp/status", params), None);
        }
        // Real parameters stay, so the router still says they are unexpected.
        assert_eq!(
            params_after("phi-lsp/status", Some(json!({"x": 1}))),
            Some(json!({"x": 1}))
        );
    }

    #[test]
    fn object_methods_get_an_empty_object_for_nothing() {
        let method = crate::framing::MALFORMED_METHOD;
        assert_eq!(params_after(method, None), Some(json!({})));
        assert_eq!(params_after(method, Some(Value::Null)), Some(json!({})));
        let reason = json!({"reason": "bad"});
        assert_eq!(params_after(method, Some(reason.clone())), Some(reason));
    }

    #[test]
    fn other_methods_and_the_id_pass_unchanged() {
        let params = Some(json!({}));
        let out = normalize(request("textDocument/inlineCompletion", params.clone()));
        let (method, id, got) = out.into_parts();
        assert_eq!(method, "textDocument/inlineCompletion");
        assert_eq!(got, params);
        assert_eq!(id, Some(7.into()));
        let (_, id, _) = normalize(request("phi-lsp/status", None)).into_parts();
        assert_eq!(id, Some(7.into()));
    }
}
