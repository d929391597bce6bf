//! Reading a policy: the directory's files, split into YAML documents, each parsed as its
//! `type:` says and checked into a [`Policy`], every problem reported with its file, line and
//! field. The document model itself is the parent module; turning rules into `rules::Rule`s is
//! `compile`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::*;

impl Policy {
    /// Loads every `*.yaml`/`*.yml` file of `dir` (sorted by name), reporting all errors at once.
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyErrors> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect(),
            Err(e) => {
                return Err(PolicyErrors(vec![PolicyError {
                    file: dir.to_path_buf(),
                    line: 0,
                    field: String::new(),
                    message: format!("cannot read policy directory: {e}"),
                }]));
            }
        };
        files.sort();
        let mut sources = Vec::with_capacity(files.len());
        let mut errors = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => sources.push((file, text)),
                Err(e) => errors.push(PolicyError {
                    file,
                    line: 0,
                    field: String::new(),
                    message: format!("cannot read file: {e}"),
                }),
            }
        }
        match Self::from_sources(sources.iter().map(|(f, t)| (f.as_path(), t.as_str()))) {
            Ok(p) if errors.is_empty() => Ok(p),
            Ok(_) => Err(PolicyErrors(errors)),
            Err(PolicyErrors(more)) => {
                errors.extend(more);
                Err(PolicyErrors(errors))
            }
        }
    }

    /// Parses and checks policy documents given as (file name, text) pairs.
    pub fn from_sources<'a>(sources: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Result<Policy, PolicyErrors> {
        let mut b = Builder::default();
        for (file, text) in sources {
            b.first_file.get_or_insert_with(|| file.to_path_buf());
            for (line, doc) in split_documents(text) {
                b.document(file, line, doc);
            }
        }
        b.finish()
    }
}

/// Splits a YAML stream at `---` lines, yielding (1-based line of the document's first line, text).
/// Written by hand because the YAML crates do not expose where each document starts, and error
/// lines must point into the file, not into the document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs.into_iter()
        .filter(|(_, d)| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')))
        .collect()
}

#[derive(Default)]
pub(super) struct Builder {
    pub(super) policy: Policy,
    pub(super) errors: Vec<PolicyError>,
    /// Where each named thing was defined, for semantic errors.
    pub(super) vm_origin: BTreeMap<String, (PathBuf, usize)>,
    pub(super) price_origin: Option<(PathBuf, usize)>,
    pub(super) key_origin: BTreeMap<String, (PathBuf, usize)>,
    pub(super) keys_seen: bool,
    /// The first file read: where a policy-wide problem (no keys at all) is reported.
    pub(super) first_file: Option<PathBuf>,
    pub(super) envelope_seen: bool,
    /// Where each rate-limit config, budget config and guard document was defined, by index.
    pub(super) rate_origin: Vec<(PathBuf, usize)>,
    pub(super) budget_origin: Vec<(PathBuf, usize)>,
    pub(super) guard_origin: Vec<(PathBuf, usize)>,
    pub(super) channel_origin: BTreeMap<String, (PathBuf, usize)>,
}

impl Builder {
    pub(super) fn err(&mut self, file: &Path, line: usize, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError { file: file.to_path_buf(), line, field: field.into(), message: message.into() });
    }

    fn parse<T: DeserializeOwned>(&mut self, file: &Path, line: usize, doc: &str) -> Option<T> {
        let de = serde_yaml_ng::Deserializer::from_str(doc);
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => Some(v),
            Err(e) => {
                let field = e.path().to_string();
                let inner = e.into_inner();
                let at = inner.location().map_or(line, |l| line + l.line() - 1);
                let msg = strip_location(&inner.to_string());
                // The YAML error may already start with the path; say it once.
                let msg = msg.strip_prefix(&format!("{field}: ")).map(str::to_owned).unwrap_or(msg);
                self.err(file, at, if field == "." { String::new() } else { field }, msg);
                None
            }
        }
    }

    fn document(&mut self, file: &Path, line: usize, doc: &str) {
        #[derive(Deserialize)]
        struct Kind {
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        let kind = match serde_yaml_ng::from_str::<Kind>(doc) {
            Ok(Kind { kind: Some(k) }) => k,
            Ok(Kind { kind: None }) => {
                return self.err(file, line, "type", "document has no `type:`");
            }
            Err(e) => {
                let at = e.location().map_or(line, |l| line + l.line() - 1);
                return self.err(file, at, "", strip_location(&e.to_string()));
            }
        };
        match kind.as_str() {
            "tollgate-providers" => {
                if let Some(d) = self.parse::<ProvidersDoc>(file, line, doc) {
                    for (i, p) in d.providers.into_iter().enumerate() {
                        if self.policy.providers.contains_key(&p.name) {
                            self.err(
                                file,
                                line,
                                format!("providers[{i}].name"),
                                format!("provider {:?} is defined twice", p.name),
                            );
                        } else if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                            self.err(
                                file,
                                line,
                                format!("providers[{i}].base_url"),
                                "must start with http:// or https://",
                            );
                        } else {
                            self.policy.providers.insert(p.name.clone(), p);
                        }
                    }
                }
            }
            "tollgate-price-card" => {
                if let Some(card) = self.parse::<PriceCard>(file, line, doc) {
                    if self.policy.price_card.is_some() {
                        self.err(file, line, "type", "a second price card; the policy takes exactly one");
                    } else {
                        self.price_origin = Some((file.to_path_buf(), line));
                        self.policy.price_card = Some(card);
                    }
                }
            }
            "tollgate-envelope" => {
                if let Some(d) = self.parse::<EnvelopeDoc>(file, line, doc) {
                    if self.envelope_seen {
                        self.err(file, line, "type", "a second envelope document");
                    }
                    for (i, r) in d.envelope.required.iter().enumerate() {
                        if !EnvelopeConfig::FIELDS.contains(&r.as_str()) {
                            self.err(
                                file,
                                line,
                                format!("required[{i}]"),
                                format!("unknown envelope field {r:?}; expected one of {:?}", EnvelopeConfig::FIELDS),
                            );
                        }
                    }
                    self.envelope_seen = true;
                    self.policy.envelope = d.envelope;
                }
            }
            "tollgate-api-keys" => {
                if let Some(d) = self.parse::<ApiKeysDoc>(file, line, doc) {
                    self.keys_seen = true;
                    self.policy.allow_anonymous |= d.allow_anonymous;
                    let keys = &mut self.policy.api_keys;
                    let mut problems = Vec::new();
                    for (i, k) in d.keys.into_iter().enumerate() {
                        let hex_ok = k.sha256.len() == 64
                            && k.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                        if !hex_ok {
                            problems.push((
                                format!("keys[{i}].sha256"),
                                "must be 64 lower-case hex digits (sha256sum of the key)".to_owned(),
                            ));
                        } else if keys.values().any(|o| o.id == k.id) {
                            problems.push((format!("keys[{i}].id"), format!("key id {:?} is used twice", k.id)));
                        } else if keys.contains_key(&k.sha256) {
                            problems.push((format!("keys[{i}].sha256"), "the same key is listed twice".to_owned()));
                        } else if let Some(f) =
                            k.caller_sets.iter().flatten().find(|f| !EnvelopeConfig::FIELDS.contains(&f.as_str()))
                        {
                            problems.push((
                                format!("keys[{i}].caller_sets"),
                                format!("unknown envelope field {f:?}; expected one of {:?}", EnvelopeConfig::FIELDS),
                            ));
                        } else {
                            self.key_origin.insert(k.id.clone(), (file.to_path_buf(), line));
                            keys.insert(k.sha256.clone(), k);
                        }
                    }
                    for (field, msg) in problems {
                        self.err(file, line, field, msg);
                    }
                }
            }
            "gateway-load-balancing-config" => {
                if let Some(vm) = self.parse::<VirtualModel>(file, line, doc) {
                    self.check_virtual_model(file, line, &vm);
                    if self.vm_origin.contains_key(&vm.name) {
                        self.err(file, line, "name", format!("virtual model {:?} is defined twice", vm.name));
                    } else {
                        self.vm_origin.insert(vm.name.clone(), (file.to_path_buf(), line));
                        self.policy.virtual_models.insert(vm.name.clone(), vm);
                    }
                }
            }
            "gateway-rate-limit-config" => {
                if let Some(c) = self.parse::<RateLimitConfig>(file, line, doc) {
                    for (i, r) in c.rules.iter().enumerate() {
                        if r.limit.tokens.is_some() == r.limit.requests.is_some() {
                            self.err(
                                file,
                                line,
                                format!("rules[{i}].limit"),
                                "set exactly one of `tokens` and `requests`",
                            );
                        }
                        if let Err(m) = parse_window_seconds(&r.limit.window) {
                            self.err(file, line, format!("rules[{i}].limit.window"), m);
                        }
                    }
                    self.rate_origin.push((file.to_path_buf(), line));
                    self.policy.rate_limits.push(c);
                }
            }
            "gateway-budget-config" => {
                if let Some(c) = self.parse::<BudgetConfig>(file, line, doc) {
                    for (i, b) in c.budgets.iter().enumerate() {
                        if !matches!(b.window.as_str(), "daily" | "weekly" | "monthly") {
                            self.err(file, line, format!("budgets[{i}].window"), "expected daily, weekly or monthly");
                        }
                    }
                    self.budget_origin.push((file.to_path_buf(), line));
                    self.policy.budgets.push(c);
                }
            }
            "tollgate-alert-channels" => {
                if let Some(d) = self.parse::<AlertChannelsDoc>(file, line, doc) {
                    for (i, c) in d.channels.into_iter().enumerate() {
                        let problem = if c.kind().is_none() {
                            Some(("name", "a channel name starts with slack:, pagerduty: or webhook:".to_owned()))
                        } else if c.url.is_some() == c.url_env.is_some() {
                            Some(("url", "set exactly one of `url` and `url_env`".to_owned()))
                        } else if c
                            .url
                            .as_deref()
                            .is_some_and(|u| !u.starts_with("http://") && !u.starts_with("https://"))
                        {
                            Some(("url", "must start with http:// or https://".to_owned()))
                        } else if self.policy.alert_channels.contains_key(&c.name) {
                            Some(("name", format!("channel {:?} is defined twice", c.name)))
                        } else {
                            None
                        };
                        match problem {
                            Some((field, msg)) => self.err(file, line, format!("channels[{i}].{field}"), msg),
                            None => {
                                self.channel_origin.insert(c.name.clone(), (file.to_path_buf(), line));
                                self.policy.alert_channels.insert(c.name.clone(), c);
                            }
                        }
                    }
                }
            }
            "tollgate-anomaly-guards" => {
                if let Some(d) = self.parse::<GuardsDoc>(file, line, doc) {
                    for g in d.guards {
                        self.guard_origin.push((file.to_path_buf(), line));
                        self.policy.guards.push(g);
                    }
                }
            }
            other => self.err(file, line, "type", format!("unknown document type {other:?}")),
        }
    }

    fn check_virtual_model(&mut self, file: &Path, line: usize, vm: &VirtualModel) {
        if vm.rules.is_empty() {
            self.err(file, line, "rules", "a virtual model needs at least one rule");
        }
        let mut ids = BTreeSet::new();
        for (i, r) in vm.rules.iter().enumerate() {
            if !ids.insert(&r.id) {
                self.err(file, line, format!("rules[{i}].id"), format!("rule id {:?} is used twice", r.id));
            }
            match vm.rule_type {
                LbRuleType::WeightBased if r.weight.is_none() => {
                    self.err(file, line, format!("rules[{i}].weight"), "weight-based rules need a weight");
                }
                LbRuleType::PriorityBased if r.priority.is_none() => {
                    self.err(file, line, format!("rules[{i}].priority"), "priority-based rules need a priority");
                }
                _ => {}
            }
        }
        if vm.rule_type == LbRuleType::WeightBased && vm.rules.iter().all(|r| r.weight.unwrap_or(0) == 0) {
            self.err(file, line, "rules", "weights add up to zero");
        }
    }

    /// Cross-document checks: every target names a known provider and has a price.
    fn finish(mut self) -> Result<Policy, PolicyErrors> {
        let mut problems = Vec::new();
        for (name, vm) in &self.policy.virtual_models {
            let (file, line) = self.vm_origin.get(name).cloned().unwrap_or_default();
            let targets = vm.rules.iter().enumerate().map(|(i, r)| (format!("rules[{i}].target"), &r.target));
            let fallbacks = vm.fallbacks.iter().enumerate().map(|(i, t)| (format!("fallbacks[{i}]"), t));
            for (field, t) in targets.chain(fallbacks) {
                if !self.policy.providers.contains_key(&t.provider) {
                    problems.push((
                        file.clone(),
                        line,
                        format!("{field}.provider"),
                        format!("unknown provider {:?}", t.provider),
                    ));
                }
                let unpriced_ok =
                    self.policy.price_card.as_ref().is_some_and(|c| c.unpriced_ok.contains(&t.to_string()));
                if self.policy.price(t).is_none() && !unpriced_ok {
                    problems.push((file.clone(), line, format!("{field}.model"), format!("{t} has no price in the price card; add one or list it under unpriced_ok (a zero price hides spend)")));
                }
            }
        }
        for k in self.policy.api_keys.values() {
            let (file, line) = self.key_origin.get(&k.id).cloned().unwrap_or_default();
            for m in &k.models {
                if m == "*" || self.policy.virtual_models.contains_key(m) {
                    continue;
                }
                let problem = match m.split_once('/') {
                    Some(_) if !k.direct_models => {
                        format!("{m:?} is a concrete model: the key needs `direct_models: true` to name it")
                    }
                    Some((provider, _)) if !self.policy.providers.contains_key(provider) => {
                        format!("unknown provider {provider:?} in {m:?}")
                    }
                    Some(_) => continue,
                    None => format!("unknown virtual model {m:?}"),
                };
                problems.push((file.clone(), line, format!("keys[id={}].models", k.id), problem));
            }
            // Every field a request must carry has to come from somewhere: the key or its caller.
            for field in &self.policy.envelope.required {
                let header = self.policy.envelope.header_of(field);
                let declared = k.declared(field, header).is_some();
                if !declared && !k.caller_may_set(field, declared) {
                    problems.push((
                        file.clone(),
                        line,
                        format!("keys[id={}].caller_sets", k.id),
                        format!("required envelope field {field:?} is neither declared by the key (metadata {header}) nor left to its caller"),
                    ));
                }
            }
        }
        if self.policy.api_keys.is_empty() && !self.policy.allow_anonymous {
            // The policy directory (the first file's), or that file when it has none.
            let file = self.first_file.clone().unwrap_or_default();
            let file = match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => file,
            };
            let message = if self.keys_seen {
                "no API key is listed: add keys, or set `allow_anonymous: true` to serve requests without one"
            } else {
                "no tollgate-api-keys document: add one with keys, or with `allow_anonymous: true` to serve requests without a key"
            };
            problems.push((file, 0, "tollgate-api-keys".to_owned(), message.to_owned()));
        }
        for (file, line, field, message) in problems {
            self.err(&file, line, field, message);
        }
        self.compile_rules();
        if self.errors.is_empty() { Ok(self.policy) } else { Err(PolicyErrors(self.errors)) }
    }
}

/// serde_yaml_ng appends " at line L column C"; the line is reported separately, in file terms.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}
