//! Who is who on the PBX: queue → group, device/extension → agent.
//!
//! Built once from plain agent and group lists (`settings::directory` makes
//! them from the configuration) and shared read-only (`Arc`); a reload
//! builds a new one. Lookups are plain hash-map hits on borrowed
//! `&str` slices of channel names, so the normalizer never allocates to ask.
//!
//! Recognised forms of an agent's device (extension `2000`):
//! `SIP/2000-0000000f`, `PJSIP/2000-00000001`, `IAX2/2000-123`, the queue
//! member `Local/2000@agents/n` and its channel halves
//! `Local/2000@agents-00000001;1`/`;2`, an `Interface`/`StateInterface`
//! (`SIP/2000`), and a queue `MemberName` equal to the agent's name.

pub use crate::ids::{AgentId, GroupId};
use std::collections::HashMap;

/// An agent as the rest of callbridge sees it.
#[derive(Debug, Clone)]
pub struct Agent {
    pub id: AgentId,
    pub name: Option<String>,
    pub extension: String,
    /// Groups the agent serves, in configuration order.
    pub groups: Vec<GroupId>,
}

/// A group as the rest of callbridge sees it.
#[derive(Debug, Clone)]
pub struct Group {
    pub id: GroupId,
    pub queue: String,
    pub agents: Vec<AgentId>,
}

#[derive(Debug, Default)]
pub struct Directory {
    agents: HashMap<AgentId, Agent>,
    groups: HashMap<GroupId, Group>,
    by_extension: HashMap<String, AgentId>,
    by_name: HashMap<String, AgentId>,
    by_queue: HashMap<String, GroupId>,
}

impl Directory {
    /// The directory of these agents and groups. Agents without an
    /// extension are not on the PBX and are left out; each agent's
    /// `groups` is filled in from the groups' member lists, in group order.
    pub fn new(agents: impl IntoIterator<Item = Agent>, groups: impl IntoIterator<Item = Group>) -> Directory {
        let mut d = Directory::default();
        for agent in agents {
            d.by_extension.insert(agent.extension.clone(), agent.id.clone());
            if let Some(name) = &agent.name {
                d.by_name.insert(name.clone(), agent.id.clone());
            }
            d.agents.insert(agent.id.clone(), Agent { groups: Vec::new(), ..agent });
        }
        for group in groups {
            d.by_queue.insert(group.queue.clone(), group.id.clone());
            for a in &group.agents {
                if let Some(agent) = d.agents.get_mut(a) {
                    agent.groups.push(group.id.clone());
                }
            }
            d.groups.insert(group.id.clone(), group);
        }
        d
    }

    pub fn agent(&self, id: &str) -> Option<&Agent> {
        self.agents.get(id)
    }

    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.get(id)
    }

    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// The group served by a PBX queue.
    pub fn group_for_queue(&self, queue: &str) -> Option<&Group> {
        self.by_queue.get(queue).and_then(|g| self.groups.get(g))
    }

    pub fn agent_for_extension(&self, exten: &str) -> Option<&Agent> {
        self.by_extension.get(exten).and_then(|a| self.agents.get(a))
    }

    /// The agent behind a channel name (`SIP/2000-0000000f`,
    /// `Local/2000@agents-00000001;2`) or an interface (`SIP/2000`,
    /// `Local/2000@agents/n`).
    pub fn agent_for_channel(&self, channel: &str) -> Option<&Agent> {
        self.agent_for_extension(device_resource(channel)?)
    }

    /// The agent behind a queue member: its interface, state interface, or
    /// member name, in that order.
    pub fn agent_for_member(
        &self,
        interface: Option<&str>,
        state_interface: Option<&str>,
        member_name: Option<&str>,
    ) -> Option<&Agent> {
        interface
            .and_then(|i| self.agent_for_channel(i))
            .or_else(|| state_interface.and_then(|i| self.agent_for_channel(i)))
            .or_else(|| member_name.and_then(|n| self.by_name.get(n)).and_then(|a| self.agents.get(a)))
    }
}

/// The resource part of a channel or interface name: `2000` for
/// `SIP/2000-0000000f`, `PJSIP/2000`, `Local/2000@agents-00000001;1` and
/// `Local/2000@agents/n`. `None` when there is no technology prefix.
pub fn device_resource(channel: &str) -> Option<&str> {
    let (tech, rest) = channel.split_once('/')?;
    if tech.is_empty() {
        return None;
    }
    if tech.eq_ignore_ascii_case("Local") {
        // Local/<exten>@<context>[-<seq>;<half>] or Local/<exten>@<context>/<options>
        let end = rest.find('@').unwrap_or(rest.len());
        return Some(&rest[..end]);
    }
    // <resource>[-<hex sequence>] ; a dial string may add /<number>.
    let rest = rest.split('/').next().unwrap_or(rest);
    match rest.rfind('-') {
        Some(dash) if dash > 0 && rest[dash + 1..].bytes().all(|c| c.is_ascii_hexdigit()) && dash + 1 < rest.len() => {
            Some(&rest[..dash])
        }
        _ => Some(rest),
    }
}

/// True for the two halves of a Local channel (`Local/…;1`, `Local/…;2`).
pub fn is_local_channel(channel: &str) -> bool {
    channel.len() > 6 && channel.as_bytes()[..6].eq_ignore_ascii_case(b"Local/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_resources() {
        assert_eq!(device_resource("SIP/2000-0000000f"), Some("2000"));
        assert_eq!(device_resource("PJSIP/2000-00000001"), Some("2000"));
        assert_eq!(device_resource("SIP/2002"), Some("2002"));
        assert_eq!(device_resource("Local/2000@agents-00000001;1"), Some("2000"));
        assert_eq!(device_resource("Local/2001@agents/n"), Some("2001"));
        assert_eq!(device_resource("SIP/carrier00-00000002"), Some("carrier00"));
        assert_eq!(device_resource("PJSIP/front-desk"), Some("front-desk"));
        assert_eq!(device_resource("nonsense"), None);
    }
}
