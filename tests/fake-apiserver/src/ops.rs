//! The verbs, on the locked state: create, get, list, replace, patch,
//! delete, each with the API server's optimistic concurrency and its error
//! answers. The HTTP layer and the in-process test API both go through here.

use serde_json::{Value, json};

use crate::{
    patch,
    selector::{FieldSelector, LabelSelector},
    state::{EventType, Gvr, Inner, ResourceType, key_of, now_rfc3339, set_rv, types_of_crd},
};

/// An error answer: becomes a `Status` object with this code and reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn with_details(mut self, ty: &ResourceType, name: &str) -> Self {
        self.details = Some(json!({
            "name": name,
            "group": ty.gvr.group,
            "kind": ty.gvr.plural,
        }));
        self
    }

    pub(crate) fn not_found(ty: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource_name(ty)),
        )
        .with_details(ty, name)
    }

    fn conflict(ty: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                resource_name(ty)
            ),
        )
        .with_details(ty, name)
    }

    pub(crate) fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `Status` object of this error.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// `pods`, `nodecidrs.weft.io`: how the server names a resource in messages.
fn resource_name(ty: &ResourceType) -> String {
    if ty.gvr.group.is_empty() {
        ty.gvr.plural.clone()
    } else {
        format!("{}.{}", ty.gvr.plural, ty.gvr.group)
    }
}

/// Where a request points.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) ty: ResourceType,
    /// The namespace of the path; `None` for cluster-scoped kinds and for
    /// lists across all namespaces.
    pub(crate) namespace: Option<String>,
}

impl Target {
    fn ns(&self) -> String {
        self.namespace.clone().unwrap_or_default()
    }
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get("metadata")?
        .get(field)?
        .as_str()
        .filter(|s| !s.is_empty())
}

fn rv_of(object: &Value) -> Option<u64> {
    meta_str(object, "resourceVersion")?.parse().ok()
}

fn rand_suffix(n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

impl Inner {
    pub(crate) fn get(&mut self, t: &Target, name: &str) -> Result<Value, ApiError> {
        self.stats.gets += 1;
        self.objects
            .get(&t.ty.gvr)
            .and_then(|o| o.get(&(t.ns(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&t.ty, name))
    }

    /// The matching objects in key order, and the revision they are at.
    pub(crate) fn list(
        &mut self,
        t: &Target,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        self.stats.lists += 1;
        let items = self
            .objects
            .get(&t.ty.gvr)
            .map(|objects| {
                objects
                    .iter()
                    .filter(|((ns, _), _)| t.namespace.as_ref().is_none_or(|want| want == ns))
                    .filter(|(_, o)| labels.matches(o) && fields.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, self.rv)
    }

    /// Checks and completes the identity fields of a body for `t`.
    fn check_body(&self, t: &Target, body: &mut Value) -> Result<(), ApiError> {
        let Some(obj) = body.as_object_mut() else {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        };
        let api_version = t.ty.gvr.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            None => {
                obj.insert("apiVersion".into(), json!(api_version));
            }
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
        }
        match obj.get("kind").and_then(Value::as_str) {
            None => {
                obj.insert("kind".into(), json!(t.ty.kind));
            }
            Some(k) if k == t.ty.kind => {}
            Some(k) => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    t.ty.kind
                )));
            }
        }
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata is not an object"))?;
        if t.ty.namespaced {
            let ns = t.ns();
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), json!(ns));
                }
            }
        } else {
            meta.remove("namespace");
        }
        Ok(())
    }

    pub(crate) fn create(&mut self, t: &Target, mut body: Value) -> Result<Value, ApiError> {
        self.stats.creates += 1;
        if t.ty.namespaced && t.namespace.is_none() {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "create a namespaced object in its namespace",
            ));
        }
        self.check_body(t, &mut body)?;
        if meta_str(&body, "name").is_none() {
            let Some(prefix) = meta_str(&body, "generateName").map(str::to_string) else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                ));
            };
            body["metadata"]["name"] = json!(format!("{prefix}{}", rand_suffix(self.rv)));
        }
        let (ns, name) = key_of(&body);
        let exists = self
            .objects
            .get(&t.ty.gvr)
            .is_some_and(|o| o.contains_key(&(ns, name.clone())));
        if exists {
            self.stats.conflicts += 1;
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource_name(&t.ty)),
            )
            .with_details(&t.ty, &name));
        }
        let crd_types = if t.ty.gvr.plural == "customresourcedefinitions" {
            Some(types_of_crd(&body).map_err(|e| ApiError::new(422, "Invalid", e))?)
        } else {
            None
        };
        if t.ty.status_subresource && t.ty.custom {
            // The real server drops .status on create when the status
            // subresource is on.
            if let Some(o) = body.as_object_mut() {
                o.remove("status");
            }
        }
        let uid = self.uid();
        let meta = &mut body["metadata"];
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
        }
        if let Some(types) = crd_types {
            for ty in types {
                self.register(ty);
            }
        }
        Ok(self.write(&t.ty.gvr, EventType::Added, body))
    }

    /// PUT: replaces the object; a `metadata.resourceVersion` in the body
    /// must be the current one. `status` set means the `/status`
    /// subresource.
    pub(crate) fn replace(
        &mut self,
        t: &Target,
        name: &str,
        mut body: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.stats.updates += 1;
        self.check_body(t, &mut body)?;
        if meta_str(&body, "name") != Some(name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let current = self.get(t, name)?;
        self.stats.gets -= 1;
        match rv_of(&body) {
            Some(rv) if Some(rv) != rv_of(&current) => {
                self.stats.conflicts += 1;
                return Err(ApiError::conflict(&t.ty, name));
            }
            Some(_) => {}
            None if t.ty.custom => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                        resource_name(&t.ty)
                    ),
                ));
            }
            None => {}
        }
        self.store_update(t, current, body, status)
    }

    /// PATCH, in any of the content types the server takes. `apply` (server
    /// side apply) creates the object when it is absent.
    pub(crate) fn patch(
        &mut self,
        t: &Target,
        name: &str,
        content_type: &str,
        patch_body: &Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        self.stats.patches += 1;
        let apply = content_type.starts_with("application/apply-patch");
        let current = match self.get(t, name) {
            Ok(c) => c,
            Err(e) if apply && e.code == 404 && !status => {
                self.stats.gets -= 1;
                let mut body = patch_body.clone();
                if meta_str(&body, "name").is_none() {
                    body["metadata"]["name"] = json!(name);
                }
                return self.create(t, body);
            }
            Err(e) => return Err(e),
        };
        self.stats.gets -= 1;
        let patched = if content_type.starts_with("application/json-patch+json") {
            match patch::json_patch(&current, patch_body) {
                Ok(p) => p,
                Err(patch::JsonPatchError::TestFailed(m)) => {
                    self.stats.conflicts += 1;
                    return Err(ApiError::new(422, "Invalid", m));
                }
                Err(patch::JsonPatchError::Invalid(m)) => {
                    return Err(ApiError::new(422, "Invalid", m));
                }
            }
        } else if content_type.starts_with("application/merge-patch+json")
            || content_type.starts_with("application/strategic-merge-patch+json")
            || apply
        {
            // A resourceVersion in a merge patch is a precondition.
            if let Some(rv) = rv_of(patch_body)
                && Some(rv) != rv_of(&current)
            {
                self.stats.conflicts += 1;
                return Err(ApiError::conflict(&t.ty, name));
            }
            let mut doc = current.clone();
            patch::merge(&mut doc, patch_body);
            doc
        } else {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format: {content_type}"),
            ));
        };
        let mut patched = patched;
        self.check_body(t, &mut patched)?;
        if meta_str(&patched, "name") != Some(name) {
            return Err(ApiError::bad_request("a patch may not change the name"));
        }
        self.store_update(t, current, patched, status)
    }

    fn store_update(
        &mut self,
        t: &Target,
        current: Value,
        mut next: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        if status {
            // Only .status changes through the subresource.
            let new_status = next.get("status").cloned();
            next = current.clone();
            match new_status {
                Some(s) => next["status"] = s,
                None => {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        } else if t.ty.status_subresource && t.ty.custom {
            // ... and not through the main resource.
            match current.get("status") {
                Some(s) => next["status"] = s.clone(),
                None => {
                    if let Some(o) = next.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        // Fields only the server sets.
        for field in [
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
        ] {
            match current["metadata"].get(field) {
                Some(v) => next["metadata"][field] = v.clone(),
                None => {
                    if let Some(m) = next["metadata"].as_object_mut() {
                        m.remove(field);
                    }
                }
            }
        }
        if let Some(rv) = rv_of(&current) {
            set_rv(&mut next, rv);
        }
        if next == current {
            // A no-op write takes no revision and sends no event.
            return Ok(current);
        }
        if next.get("spec") != current.get("spec") {
            let generation = current["metadata"]["generation"].as_u64().unwrap_or(1);
            next["metadata"]["generation"] = json!(generation + 1);
        }
        Ok(self.write(&t.ty.gvr, EventType::Modified, next))
    }

    /// DELETE, honouring `preconditions` of the DeleteOptions body.
    pub(crate) fn delete(
        &mut self,
        t: &Target,
        name: &str,
        options: Option<&Value>,
    ) -> Result<Value, ApiError> {
        self.stats.deletes += 1;
        let current = self.get(t, name)?;
        self.stats.gets -= 1;
        if let Some(pre) = options.and_then(|o| o.get("preconditions")) {
            if let Some(want) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(want) != meta_str(&current, "resourceVersion")
            {
                self.stats.conflicts += 1;
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                        meta_str(&current, "resourceVersion").unwrap_or_default()
                    ),
                )
                .with_details(&t.ty, name));
            }
            if let Some(want) = pre.get("uid").and_then(Value::as_str)
                && Some(want) != meta_str(&current, "uid")
            {
                self.stats.conflicts += 1;
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed: UID in precondition: {want}, UID in object meta: {}",
                        meta_str(&current, "uid").unwrap_or_default()
                    ),
                )
                .with_details(&t.ty, name));
            }
        }
        if t.ty.gvr.plural == "customresourcedefinitions"
            && let Ok(types) = types_of_crd(&current)
        {
            for ty in types {
                self.types.remove(&ty.gvr);
                self.objects.remove(&ty.gvr);
            }
        }
        Ok(self.write(&t.ty.gvr, EventType::Deleted, current))
    }

    /// The type serving `apiVersion` and `kind` (for the in-process API).
    pub(crate) fn type_of(&self, api_version: &str, kind: &str) -> Option<ResourceType> {
        self.types
            .values()
            .find(|t| t.gvr.api_version() == api_version && t.kind == kind)
            .cloned()
    }

    pub(crate) fn type_at(&self, gvr: &Gvr) -> Option<ResourceType> {
        self.types.get(gvr).cloned()
    }
}
