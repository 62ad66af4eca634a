//! The *route* phase: which chain of models may serve a request — the requested model, then its fallbacks in
//! order, each once. Content-aware rules and budget downgrades plug in here.

use std::sync::Arc;

use smallvec::SmallVec;

use crate::config::ModelKind;
use crate::protocol::{Api, ApiError, RequestInfo};
use crate::state::{Model, Runtime};

/// The models tried for a request, in order.
pub type Chain = SmallVec<[Arc<Model>; 4]>;

/// The requested model: configured, and of the kind the API serves.
pub fn requested_model(rt: &Runtime, api: Api, info: &RequestInfo) -> Result<Arc<Model>, ApiError> {
    let model = rt.models.get(&info.model).ok_or_else(|| ApiError::model_not_found(&info.model))?;
    let (wanted, what) = match api {
        Api::Chat => (ModelKind::Chat, "chat"),
        Api::Embeddings => (ModelKind::Embeddings, "embeddings"),
    };
    if model.cfg.kind != wanted {
        return Err(ApiError::invalid("wrong_model_kind", format!("The model `{}` is not a {what} model", info.model)));
    }
    Ok(model.clone())
}

/// The chain for `model`: itself, then its fallbacks in order (each once).
pub fn chain(rt: &Runtime, model: &Arc<Model>) -> Chain {
    let mut out = Chain::new();
    out.push(model.clone());
    for f in &model.cfg.fallbacks {
        if let Some(m) = rt.models.get(f) {
            if !out.iter().any(|x| Arc::ptr_eq(x, m)) {
                out.push(m.clone());
            }
        }
    }
    out
}
