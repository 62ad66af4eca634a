//! The *route* phase: which chain of models may serve a request. A route alias (`[[routes]]`) picks its model
//! by the request's content; budgets may send it to a cheaper model or refuse it; then the chain is that model
//! followed by its fallbacks in order, each once.
//!
//! The reason a request is served by another model than it named travels as a [`Cow`] label
//! (`x-sheepdog-route-reason`): a rule's name, `default`, `budget:NAME`; `fallback` is set when the answer
//! comes (the last change wins). Budget reservations made here are settled by *finish*.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use sheepdog_policy::budget::Decision;
use sheepdog_policy::pricing::{self, Multiplier, Nanos, Tokens};
use sheepdog_policy::routing;
use smallvec::SmallVec;

use crate::config::ModelKind;
use crate::protocol::openai::content;
use crate::protocol::{Api, ApiError, RequestInfo};
use crate::state::{Budget, Model, Runtime};

/// The models tried for a request, in order.
pub type Chain = SmallVec<[Arc<Model>; 4]>;

/// Why another model than the requested one serves.
pub type Reason = Option<Cow<'static, str>>;

/// The route reason of an alias answered by its default rule.
pub const DEFAULT: &str = "default";

/// The model a request names, or the one its alias's rules pick for it; of the kind the API serves.
pub fn resolve(
    rt: &Runtime,
    api: Api,
    info: &RequestInfo,
    body: &[u8],
    headers: &HeaderMap,
) -> Result<(Arc<Model>, Reason), ApiError> {
    let (model, reason) = match rt.models.get(&info.model) {
        Some(m) => (m, None),
        None => {
            let alias = rt.aliases.get(&info.model).ok_or_else(|| ApiError::model_not_found(&info.model))?;
            let req = RouteRequest { body, info, headers, text: OnceCell::new(), metadata: OnceCell::new() };
            let rule = alias.router.pick(&req, crate::protocol::tokens::count).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "model_not_found",
                    format!("No route of `{}` matches this request, and it has no default route.", info.model),
                )
            })?;
            let target = alias.target(&rule.name).and_then(|t| rt.models.get(t));
            let target = target.ok_or_else(|| ApiError::model_not_found(&info.model))?;
            let reason = if rule.default { Cow::Borrowed(DEFAULT) } else { Cow::Owned(rule.name.clone()) };
            (target, Some(reason))
        }
    };
    let (wanted, what) = match api {
        Api::Chat => (ModelKind::Chat, "chat"),
        Api::Embeddings => (ModelKind::Embeddings, "embeddings"),
    };
    if model.cfg.kind != wanted {
        return Err(ApiError::invalid("wrong_model_kind", format!("The model `{}` is not a {what} model", info.model)));
    }
    Ok((model.clone(), reason))
}

/// A request as the routing rules see it; the text and metadata are extracted once, when a rule needs them.
struct RouteRequest<'a> {
    body: &'a [u8],
    info: &'a RequestInfo,
    headers: &'a HeaderMap,
    text: OnceCell<Cow<'a, str>>,
    metadata: OnceCell<Vec<(String, String)>>,
}

impl routing::Request for RouteRequest<'_> {
    fn last_user_text(&self) -> &str {
        self.text.get_or_init(|| content::last_user_text(self.body, self.info))
    }
    fn has_tools(&self) -> bool {
        self.info.has_tools
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn metadata(&self, key: &str) -> Option<&str> {
        let m = self.metadata.get_or_init(|| content::metadata(self.body, self.info));
        m.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Money a budget holds back for a request in flight.
pub struct Reservation {
    /// The budget.
    pub budget: Arc<Budget>,
    /// What it reserved.
    pub amount: Nanos,
}

/// Reservations of one request (rarely more than two budgets apply).
pub type Reservations = SmallVec<[Reservation; 2]>;

/// The most a request for `model` is expected to cost: `tokens` at its prices on its costliest endpoint.
pub fn estimate_cost(model: &Model, tokens: &Tokens) -> Nanos {
    let multiplier = model.members.iter().map(|m| m.endpoint.price_multiplier).max().unwrap_or(Multiplier::ONE);
    pricing::cost(&model.pricing, tokens, multiplier)
}

/// Whether `cheaper` costs less than `model` per token (input and output list prices together).
fn is_cheaper(cheaper: &Model, model: &Model) -> bool {
    let sum = |m: &Model| m.pricing.input.0.saturating_add(m.pricing.output.0);
    sum(cheaper) < sum(model)
}

/// What the budgets decided for a request.
pub struct Budgeted {
    /// The model that will serve.
    pub model: Arc<Model>,
    /// `budget:NAME` when a budget changed it.
    pub reason: Option<Arc<str>>,
    /// The money held back for the request.
    pub held: Reservations,
}

/// Ask every budget that applies to `model` and `client`: each reserves the request's estimated cost, or sends
/// it to its cheaper `downgrade_to` model (then every budget decides again for that one), or refuses it with
/// 429 `budget_exceeded` until its period ends. Returns the model that will serve, the budget reason when it
/// changed, and the reservations (released again on refusal).
pub fn budgets(
    rt: &Runtime,
    mut model: Arc<Model>,
    client: Option<&str>,
    tokens: &Tokens,
    unix_ms: i64,
) -> Result<Budgeted, ApiError> {
    let mut reason = None;
    let mut held = Reservations::new();
    // Each pass either admits or moves to a strictly cheaper model, so this ends; the bound is a safeguard.
    'decide: for _ in 0..=rt.budgets.len() {
        release(&mut held, unix_ms);
        let estimate = estimate_cost(&model, tokens);
        for b in rt.budgets.iter().filter(|b| b.applies(&model.cfg.name, client)) {
            let target = b.cfg.downgrade_to.as_ref().and_then(|t| rt.models.get(t));
            let target = target.filter(|t| !Arc::ptr_eq(t, &model) && is_cheaper(t, &model));
            match b.admit(estimate, target.is_some(), unix_ms) {
                Decision::Admit => held.push(Reservation { budget: b.clone(), amount: estimate }),
                Decision::Downgrade => {
                    model = target.cloned().unwrap_or_else(|| unreachable!("downgrade needs a target"));
                    reason = Some(b.reason.clone());
                    continue 'decide;
                }
                Decision::Block { retry_after_s } => {
                    release(&mut held, unix_ms);
                    return Err(exceeded(b, retry_after_s));
                }
            }
        }
        return Ok(Budgeted { model, reason, held });
    }
    release(&mut held, unix_ms);
    Ok(Budgeted { model, reason, held })
}

/// Give back reservations of a request that will not go on.
fn release(held: &mut Reservations, unix_ms: i64) {
    for r in held.drain(..) {
        r.budget.settle(r.amount, Nanos::ZERO, unix_ms);
    }
}

fn exceeded(b: &Budget, retry_after_s: u64) -> ApiError {
    let limit = b.cfg.limit_usd.unwrap_or_default();
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "insufficient_quota",
        "budget_exceeded",
        format!(
            "The {} budget `{}` is spent (limit ${limit:.2}); it resets in {}s, at the start of the next {} (UTC).",
            b.cfg.period.name(),
            b.cfg.name,
            retry_after_s,
            b.cfg.period.name()
        ),
    )
    .retry_after(retry_after_s)
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
