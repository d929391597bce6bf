//! The policy's alert channels resolved for delivery: each channel's kind, its URL and
//! PagerDuty routing key (read from the environment where the policy names a variable), or
//! why it cannot be delivered to; and the channel-kind label that metrics carry.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use tollgate_schemas::policy::{AlertChannel, ChannelKind};
use tracing::warn;

pub(super) fn kind_label(kind: Option<ChannelKind>) -> &'static str {
    match kind {
        Some(ChannelKind::Slack) => "slack",
        Some(ChannelKind::PagerDuty) => "pagerduty",
        Some(ChannelKind::Webhook) => "webhook",
        None => "unknown",
    }
}

/// The kind a channel name says, for names the policy does not define.
pub(super) fn kind_of_name(name: &str) -> Option<ChannelKind> {
    match name.split_once(':')?.0 {
        "slack" => Some(ChannelKind::Slack),
        "pagerduty" => Some(ChannelKind::PagerDuty),
        "webhook" => Some(ChannelKind::Webhook),
        _ => None,
    }
}

/// Why a channel cannot be delivered to at all; found when the channels are set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Unusable {
    #[error("channel kind is not slack, pagerduty or webhook")]
    UnknownKind,
    #[error("channel has no url (url_env {0:?} is not set)")]
    NoUrl(Option<String>),
    #[error("channel url is not a valid http(s) URL")]
    BadUrl,
    #[error("pagerduty channel has no routing key (routing_key_env {0:?} is not set)")]
    NoRoutingKey(Option<String>),
}

/// A channel resolved for delivery: URL and routing key read from the environment.
pub(super) struct Channel {
    pub(super) name: String,
    pub(super) kind: Option<ChannelKind>,
    pub(super) target: Result<reqwest::Url, Unusable>,
    pub(super) routing_key: Option<String>,
}

/// Names only: the URL and the routing key are secrets.
impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel").field("name", &self.name).field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Channel {
    fn resolve(c: &AlertChannel) -> Self {
        let kind = c.kind();
        let routing_key = c
            .routing_key
            .clone()
            .or_else(|| c.routing_key_env.as_ref().and_then(|v| std::env::var(v).ok()))
            .filter(|k| !k.is_empty());
        let target = match (kind, c.resolve_url()) {
            (None, _) => Err(Unusable::UnknownKind),
            (Some(_), None) => Err(Unusable::NoUrl(c.url_env.clone())),
            (Some(kind), Some(url)) => match reqwest::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {
                    if kind == ChannelKind::PagerDuty && routing_key.is_none() {
                        Err(Unusable::NoRoutingKey(c.routing_key_env.clone()))
                    } else {
                        Ok(u)
                    }
                }
                _ => Err(Unusable::BadUrl),
            },
        };
        Self { name: c.name.clone(), kind, target, routing_key }
    }
}

pub(super) type Channels = BTreeMap<String, Arc<Channel>>;

pub(super) fn resolve_all(channels: &BTreeMap<String, AlertChannel>) -> Channels {
    channels
        .iter()
        .map(|(name, c)| {
            let resolved = Channel::resolve(c);
            if let Err(problem) = &resolved.target {
                warn!(channel = %name, %problem, "alert channel cannot be delivered to");
            }
            (name.clone(), Arc::new(resolved))
        })
        .collect()
}
