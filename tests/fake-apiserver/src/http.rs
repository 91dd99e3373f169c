//! The HTTP side: URL paths to kinds and verbs, list and watch streaming,
//! discovery, and the `/__fake/` test hooks of the binary.

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    listener::Control,
    ops::{ApiError, Target},
    selector::{FieldSelector, LabelSelector},
    state::{EventType, Filter, Frame, Gvr, Inner, Watcher, frame},
};

/// Everything the handlers share.
pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    /// Cancelled to cut every open watch connection; replaced afterwards.
    pub(crate) drop_watches: Mutex<CancellationToken>,
    /// Takes the accept loop off the network and back.
    pub(crate) control: mpsc::UnboundedSender<Control>,
}

/// How the server comes back after [`crate::FakeApiServer::go_away`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// With its event log: watches resume where they were.
    KeepingHistory,
    /// Without it, as an API server whose watch cache starts afresh: a
    /// watch resuming from an earlier resourceVersion gets 410 Gone.
    LosingHistory,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking handler leaves the maps whole (single inserts).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn drop_token(&self) -> CancellationToken {
        self.drop_watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Cuts every open watch mid-stream, as a broken connection would.
    pub(crate) fn drop_all_watches(&self) {
        let mut token = self.drop_watches.lock().unwrap_or_else(|p| p.into_inner());
        token.cancel();
        *token = CancellationToken::new();
    }

    pub(crate) fn set_unavailable(&self, on: bool) {
        self.lock().unavailable = on;
        if on {
            self.drop_all_watches();
        }
    }

    pub(crate) async fn go_away(&self) {
        let (ack, done) = oneshot::channel();
        if self.control.send(Control::Away(ack)).is_ok() {
            let _ = done.await;
        }
    }

    pub(crate) async fn come_back(&self, restart: Restart) -> io::Result<()> {
        if restart == Restart::LosingHistory {
            self.lock().compact();
        }
        let (ack, done) = oneshot::channel();
        self.control
            .send(Control::Back(ack))
            .map_err(|_| io::Error::other("the fake API server has stopped"))?;
        done.await
            .map_err(|_| io::Error::other("the fake API server has stopped"))?
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn truthy(q: &BTreeMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

/// What a path names.
enum Route {
    Version,
    CoreGroups,
    Groups,
    Resources {
        group: String,
        version: String,
    },
    Collection(Target),
    Object {
        target: Target,
        name: String,
        subresource: Option<String>,
    },
}

fn route(inner: &Inner, path: &str) -> Result<Route, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api"] => return Ok(Route::CoreGroups),
        ["apis"] => return Ok(Route::Groups),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    if rest.is_empty() {
        return Ok(Route::Resources {
            group: group.into(),
            version: version.into(),
        });
    }
    let lookup = |plural: &str| inner.type_at(&Gvr::new(group, version, plural));
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    // namespaces/<ns>/<plural>[/<name>[/<sub>]] when <plural> is namespaced.
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && let Some(ty) = lookup(rest[2]).filter(|t| t.namespaced)
    {
        let target = Target {
            ty,
            namespace: Some(rest[1].to_string()),
        };
        return match rest.len() {
            3 => Ok(Route::Collection(target)),
            4 | 5 => Ok(Route::Object {
                target,
                name: rest[3].to_string(),
                subresource: rest.get(4).map(|s| s.to_string()),
            }),
            _ => Err(not_found()),
        };
    }
    let ty = lookup(rest[0]).ok_or_else(not_found)?;
    let target = Target {
        ty: ty.clone(),
        namespace: None,
    };
    match rest.len() {
        1 => Ok(Route::Collection(target)),
        2 | 3 if !ty.namespaced => Ok(Route::Object {
            target,
            name: rest[1].to_string(),
            subresource: rest.get(2).map(|s| s.to_string()),
        }),
        _ => Err(not_found()),
    }
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| ApiError::bad_request(format!("the body does not parse: {e}")))
}

/// Answers any request: hooks first (latency, injected failures), then the
/// API.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let full = uri.to_string();
    if let Some(hook) = path.strip_prefix("/__fake/") {
        return admin(&shared, &method, hook, &query(&uri));
    }
    {
        let mut inner = shared.lock();
        if inner.unavailable {
            inner.stats.unavailable += 1;
            return error_response(&ApiError::new(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request (injected outage)",
            ));
        }
    }
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    {
        let mut inner = shared.lock();
        let hit = inner.failures.iter_mut().position(|f| {
            f.remaining > 0
                && f.method.as_deref().is_none_or(|m| m == method.as_str())
                && f.path_contains.as_deref().is_none_or(|p| full.contains(p))
        });
        if let Some(i) = hit {
            let code = inner.failures[i].code;
            inner.failures[i].remaining -= 1;
            inner.failures.retain(|f| f.remaining > 0);
            inner.stats.injected += 1;
            let e = ApiError::new(code, "InternalError", "injected failure");
            return error_response(&e);
        }
    }
    match serve(&shared, &method, &uri, &headers, &body) {
        Ok(Served::Json(code, v)) => json_response(code, &v),
        Ok(Served::Watch(w)) => watch_response(shared, w),
        Err(e) => error_response(&e),
    }
}

enum Served {
    Json(u16, Value),
    Watch(WatchStart),
}

fn serve(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Served, ApiError> {
    let q = query(uri);
    let mut inner = shared.lock();
    let route = route(&inner, uri.path())?;
    match (method.clone(), route) {
        (Method::GET, Route::Version) => Ok(Served::Json(
            200,
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-weft-fake", "platform": "linux/amd64"}),
        )),
        (Method::GET, Route::CoreGroups) => Ok(Served::Json(
            200,
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        )),
        (Method::GET, Route::Groups) => Ok(Served::Json(200, groups(&inner))),
        (Method::GET, Route::Resources { group, version }) => {
            Ok(Served::Json(200, resources(&inner, &group, &version)?))
        }
        (Method::GET, Route::Collection(t)) => {
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
                .map_err(ApiError::bad_request)?;
            if truthy(&q, "watch") {
                return start_watch(&mut inner, t, labels, fields, &q).map(Served::Watch);
            }
            check_list_rv(&mut inner, &q)?;
            let (items, rv) = inner.list(&t, &labels, &fields);
            Ok(Served::Json(
                200,
                json!({
                    "kind": format!("{}List", t.ty.kind),
                    "apiVersion": t.ty.gvr.api_version(),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            ))
        }
        (Method::POST, Route::Collection(t)) => {
            Ok(Served::Json(201, inner.create(&t, parse_body(body)?)?))
        }
        (
            method,
            Route::Object {
                target,
                name,
                subresource,
            },
        ) => {
            let status = match subresource.as_deref() {
                None => false,
                Some("status") => true,
                Some(other) => {
                    return Err(ApiError::new(
                        404,
                        "NotFound",
                        format!("subresource {other:?} is not served"),
                    ));
                }
            };
            match method {
                Method::GET => Ok(Served::Json(200, inner.get(&target, &name)?)),
                Method::PUT => Ok(Served::Json(
                    200,
                    inner.replace(&target, &name, parse_body(body)?, status)?,
                )),
                Method::PATCH => {
                    let ct = headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let created_before = inner.get(&target, &name).is_ok();
                    inner.stats.gets -= 1;
                    let out = inner.patch(&target, &name, &ct, &parse_body(body)?, status)?;
                    Ok(Served::Json(if created_before { 200 } else { 201 }, out))
                }
                Method::DELETE if !status => {
                    let options = parse_body(body)?;
                    Ok(Served::Json(
                        200,
                        inner.delete(&target, &name, Some(&options))?,
                    ))
                }
                _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
            }
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", "method not allowed")),
    }
}

/// A list at an exact old revision cannot be served from memory: too old
/// is 410, too new is the server's 504 "Too large resource version".
fn check_list_rv(inner: &mut Inner, q: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let Some(rv) = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()) else {
        return Ok(());
    };
    if rv > inner.rv {
        return Err(ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {rv}, current: {}", inner.rv),
        ));
    }
    let exact = q.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
    if exact && rv != inner.rv && rv < inner.oldest_resumable {
        inner.stats.gone += 1;
        return Err(ApiError::gone(format!(
            "too old resource version: {rv} ({})",
            inner.oldest_resumable
        )));
    }
    Ok(())
}

fn groups(inner: &Inner) -> Value {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for gvr in inner.types.keys().filter(|g| !g.group.is_empty()) {
        let versions = groups.entry(&gvr.group).or_default();
        if !versions.contains(&gvr.version.as_str()) {
            versions.push(&gvr.version);
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resources(inner: &Inner, group: &str, version: &str) -> Result<Value, ApiError> {
    let list: Vec<Value> = inner
        .types
        .values()
        .filter(|t| t.gvr.group == group && t.gvr.version == version)
        .flat_map(|t| {
            let verbs = json!([
                "create", "delete", "get", "list", "patch", "update", "watch"
            ]);
            let main = json!({
                "name": t.gvr.plural, "singularName": t.kind.to_lowercase(),
                "namespaced": t.namespaced, "kind": t.kind, "verbs": verbs,
            });
            let status = json!({
                "name": format!("{}/status", t.gvr.plural), "singularName": "",
                "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"],
            });
            if t.status_subresource {
                vec![main, status]
            } else {
                vec![main]
            }
        })
        .collect();
    if list.is_empty() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    let gv = Gvr::new(group, version, "").api_version();
    Ok(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

/// A watch accepted: what to send first, and the live feed.
struct WatchStart {
    initial: VecDeque<Frame>,
    /// End the stream once `initial` is sent (an ERROR was queued).
    end_after_initial: bool,
    rx: mpsc::UnboundedReceiver<Frame>,
    bookmarks: bool,
    timeout: Duration,
    kind: String,
    api_version: String,
}

fn bookmark(kind: &str, api_version: &str, rv: u64, initial_end: bool) -> Frame {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    frame(
        "BOOKMARK",
        &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
    )
}

fn start_watch(
    inner: &mut Inner,
    t: Target,
    labels: LabelSelector,
    fields: FieldSelector,
    q: &BTreeMap<String, String>,
) -> Result<WatchStart, ApiError> {
    inner.stats.watches += 1;
    let filter = Filter {
        gvr: t.ty.gvr.clone(),
        namespace: t.namespace.clone(),
        labels,
        fields,
    };
    let bookmarks = truthy(q, "allowWatchBookmarks");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut initial = VecDeque::new();
    let mut start = WatchStart {
        initial: VecDeque::new(),
        end_after_initial: false,
        rx,
        bookmarks,
        timeout,
        kind: t.ty.kind.clone(),
        api_version: t.ty.gvr.api_version(),
    };
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let gone = |inner: &mut Inner, message: String| {
        inner.stats.gone += 1;
        let status = ApiError::gone(message).status();
        frame("ERROR", &status)
    };
    if inner.gone_next > 0 {
        inner.gone_next -= 1;
        start.initial.push_back(gone(
            inner,
            format!("too old resource version: {rv_param} (forced by the test)"),
        ));
        start.end_after_initial = true;
        return Ok(start);
    }
    let send_initial = truthy(q, "sendInitialEvents");
    if rv_param.is_empty() || rv_param == "0" || send_initial {
        // "Start at most recent" / "any": the current state as ADDED events.
        let (items, rv) = inner.list(&t, &filter.labels, &filter.fields);
        inner.stats.lists -= 1;
        for item in &items {
            initial.push_back(frame(EventType::Added.as_str(), item));
        }
        if send_initial {
            initial.push_back(bookmark(&start.kind, &start.api_version, rv, true));
        }
    } else {
        let Ok(since) = rv_param.parse::<u64>() else {
            return Err(ApiError::bad_request(format!(
                "invalid resourceVersion {rv_param:?}"
            )));
        };
        if since < inner.oldest_resumable {
            let oldest = inner.oldest_resumable;
            start.initial.push_back(gone(
                inner,
                format!("too old resource version: {since} ({oldest})"),
            ));
            start.end_after_initial = true;
            return Ok(start);
        }
        for event in inner.log.iter().filter(|e| e.rv > since) {
            if let Some(f) = filter.frame_for(event) {
                initial.push_back(f);
            }
        }
    }
    inner.watchers.push(Watcher { filter, tx });
    start.initial = initial;
    Ok(start)
}

struct WatchState {
    shared: Arc<Shared>,
    start: WatchStart,
    dropped: CancellationToken,
    deadline: tokio::time::Instant,
    tick: tokio::time::Interval,
    done: bool,
}

fn line(f: &Frame) -> Bytes {
    let mut s = f.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch_response(shared: Arc<Shared>, start: WatchStart) -> Response {
    let interval = shared.lock().bookmark_interval;
    let mut tick = tokio::time::interval(interval);
    tick.reset();
    let state = WatchState {
        dropped: shared.drop_token(),
        deadline: tokio::time::Instant::now() + start.timeout,
        shared,
        start,
        tick,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if let Some(f) = s.start.initial.pop_front() {
                return Some((Ok::<_, io::Error>(line(&f)), s));
            }
            if s.start.end_after_initial {
                return None;
            }
            tokio::select! {
                _ = s.dropped.cancelled() => {
                    s.done = true;
                    return Some((Err(io::Error::other("watch connection dropped by the test")), s));
                }
                _ = tokio::time::sleep_until(s.deadline) => return None,
                f = s.start.rx.recv() => match f {
                    Some(f) => s.start.initial.push_back(f),
                    None => return None,
                },
                _ = s.tick.tick(), if s.start.bookmarks => {
                    // Under the lock nothing new is sent, so after draining
                    // the channel every event up to `rv` is queued.
                    let mut inner = s.shared.lock();
                    while let Ok(f) = s.start.rx.try_recv() {
                        s.start.initial.push_back(f);
                    }
                    inner.stats.bookmarks += 1;
                    let rv = inner.rv;
                    drop(inner);
                    let b = bookmark(&s.start.kind, &s.start.api_version, rv, false);
                    s.start.initial.push_back(b);
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

/// The binary's test hooks, under `/__fake/`.
fn admin(
    shared: &Arc<Shared>,
    method: &Method,
    hook: &str,
    q: &BTreeMap<String, String>,
) -> Response {
    let num = |k: &str, default: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(default);
    if method != Method::POST && hook != "stats" {
        return error_response(&ApiError::new(405, "MethodNotAllowed", "use POST"));
    }
    match hook {
        "gone" => shared.lock().gone_next += num("count", 1) as usize,
        "compact" => shared.lock().compact(),
        "drop-watches" => shared.drop_all_watches(),
        "latency" => shared.lock().latency = Duration::from_millis(num("ms", 0)),
        "unavailable" => {
            let ms = num("ms", 0);
            shared.set_unavailable(true);
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                shared.set_unavailable(false);
            });
        }
        "away" => {
            let ms = num("ms", 0);
            let restart = if num("restart", 0) == 1 {
                Restart::LosingHistory
            } else {
                Restart::KeepingHistory
            };
            let shared = shared.clone();
            // This very answer travels on a connection the outage cuts, so
            // the outage starts just after it.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                shared.go_away().await;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Err(e) = shared.come_back(restart).await {
                    tracing::error!(error = %e, "fake API server: cannot listen again");
                }
            });
        }
        "fail" => shared.lock().failures.push(crate::state::Failure {
            method: q.get("method").cloned(),
            path_contains: q.get("path").cloned(),
            code: num("code", 500) as u16,
            remaining: num("count", 1) as usize,
        }),
        "stats" => {
            let s = shared.lock().stats.clone();
            return json_response(
                200,
                &json!({
                    "lists": s.lists, "watches": s.watches, "gets": s.gets,
                    "creates": s.creates, "updates": s.updates, "patches": s.patches,
                    "deletes": s.deletes, "conflicts": s.conflicts, "gone": s.gone,
                    "injected": s.injected, "bookmarks": s.bookmarks,
                    "unavailable": s.unavailable,
                }),
            );
        }
        _ => return error_response(&ApiError::new(404, "NotFound", "unknown hook")),
    }
    json_response(200, &json!({"ok": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let uri: Uri = "/api/v1/pods?labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1"
            .parse()
            .expect("uri");
        let q = query(&uri);
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert!(truthy(&q, "watch"));
        assert_eq!(percent_decode("100%"), "100%");
    }
}
