//! Resolves a virtual model to the ordered list of concrete targets to try.

use rand::Rng;
use tollgate_schemas::policy::{LbRuleType, Target, VirtualModel};

/// One target to try, with its own time limit for the provider's first answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt<'a> {
    pub target: &'a Target,
    pub timeout_ms: Option<u64>,
}

/// The order in which targets are tried: the rule chosen by weight or priority first, then the
/// other rules (priority order, or by weight), then `fallbacks` in the order written.
pub fn plan<'a>(vm: &'a VirtualModel, rng: &mut impl Rng) -> Vec<Attempt<'a>> {
    let mut rules: Vec<_> = vm.rules.iter().collect();
    match vm.rule_type {
        LbRuleType::PriorityBased => rules.sort_by_key(|r| r.priority.unwrap_or(u32::MAX)),
        LbRuleType::WeightBased => {
            rules.sort_by_key(|r| std::cmp::Reverse(r.weight.unwrap_or(0)));
            let total: u64 = rules.iter().map(|r| u64::from(r.weight.unwrap_or(0))).sum();
            if total > 0 {
                let mut pick = rng.random_range(0..total);
                let chosen = rules
                    .iter()
                    .position(|r| {
                        let w = u64::from(r.weight.unwrap_or(0));
                        if pick < w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .unwrap_or(0);
                let first = rules.remove(chosen);
                rules.insert(0, first);
            }
        }
    }
    let mut out: Vec<Attempt<'a>> =
        rules.into_iter().map(|r| Attempt { target: &r.target, timeout_ms: r.timeout_ms }).collect();
    for f in &vm.fallbacks {
        if !out.iter().any(|a| a.target == f) {
            out.push(Attempt { target: f, timeout_ms: None });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;
    use tollgate_schemas::policy::Policy;

    fn demo() -> Policy {
        Policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/policy")).unwrap()
    }

    #[test]
    fn weights_split_traffic() {
        let p = demo();
        let vm = &p.virtual_models["intent-fast"];
        let mut rng = rand::rng();
        let n = 20_000;
        let haiku = (0..n).filter(|_| plan(vm, &mut rng)[0].target.model == "claude-haiku-4-5").count();
        let share = haiku as f64 / n as f64;
        assert!((0.88..=0.92).contains(&share), "primary share {share}");
    }

    #[test]
    fn fallbacks_come_last_in_order() {
        let p = demo();
        let plan = plan(&p.virtual_models["intent-fast"], &mut rand::rng());
        let names: Vec<String> = plan.iter().map(|a| a.target.to_string()).collect();
        assert_eq!(names.len(), 4);
        assert_eq!(&names[2..], ["openai/gpt-4o-mini", "vertex/gemini-2.0-flash"]);
    }

    #[test]
    fn priority_order() {
        let p = demo();
        let plan = plan(&p.virtual_models["chat-default"], &mut rand::rng());
        assert_eq!(plan[0].target.model, "gpt-4o-mini");
        assert_eq!(plan[1].target.model, "claude-sonnet-4-6");
    }
}
