//! Route aliases of a snapshot (`[[routes]]`): each alias's rules compiled once into a
//! [`sheepdog_policy::routing::Router`], with the model each rule sends to. No live state: rebuilt on reload.

use std::collections::HashMap;

use sheepdog_policy::routing::{Router, RuleSpec};

use crate::config::RouteConfig;

/// One alias (`model = "auto"`) and its rules.
pub struct Alias {
    /// The compiled rules, in file order.
    pub router: Router,
    /// Rule name -> the model it sends to.
    targets: HashMap<String, String>,
}

impl Alias {
    /// The model a rule sends to.
    pub fn target(&self, rule: &str) -> Option<&str> {
        self.targets.get(rule).map(String::as_str)
    }
}

/// Compile every alias of the config. A rule whose regex does not compile was refused by the config check;
/// should one get here anyway, its alias is left out (requests for it get 404) and the reason is logged.
pub fn build(routes: &[RouteConfig]) -> HashMap<String, Alias> {
    let mut by_alias: HashMap<&str, Vec<&RouteConfig>> = HashMap::new();
    for r in routes {
        by_alias.entry(&r.model).or_default().push(r);
    }
    let mut out = HashMap::with_capacity(by_alias.len());
    for (alias, rules) in by_alias {
        let specs = rules
            .iter()
            .map(|r| RuleSpec {
                name: r.name.clone(),
                regex: r.regex.clone(),
                keywords: r.keywords.clone(),
                min_tokens: r.min_prompt_tokens,
                max_tokens: r.max_prompt_tokens,
                has_code: r.has_code,
                has_tools: r.has_tools,
                headers: r.headers.clone(),
                metadata: r.metadata.clone(),
                default: r.default,
            })
            .collect();
        match Router::new(specs) {
            Ok(router) => {
                let targets = rules.iter().map(|r| (r.name.clone(), r.target.clone())).collect();
                out.insert(alias.to_string(), Alias { router, targets });
            }
            Err(e) => tracing::error!(alias, error = %e, "route alias left out"),
        }
    }
    out
}
