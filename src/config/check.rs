//! Checks across entries of the configuration: agents without extension,
//! duplicate ids, extensions and queues, groups without agents, references
//! to unknown agents or groups, redirects without a caller lookup, and
//! loops through overflow and redirects.
//!
//! These run on the raw [`toml::Table`] after the key/type walk
//! (`schema.rs`), reading leniently: a value of the wrong type was already
//! reported there and is simply skipped here, so one mistake yields one
//! message, and a broken entry never hides the problems of the others.

use super::schema::suggest;
use std::collections::{HashMap, HashSet, VecDeque};
use toml::{Table, Value};

struct AgentEntry<'a> {
    index: usize,
    table: &'a Table,
    id: Option<&'a str>,
}

struct GroupEntry<'a> {
    index: usize,
    table: &'a Table,
    id: Option<&'a str>,
}

/// The tables of an array of tables (`[[groups]]`), with their index.
fn entries<'a>(root: &'a Table, key: &str) -> Vec<(usize, &'a Table)> {
    root.get(key)
        .and_then(Value::as_array)
        .map(|items| items.iter().enumerate().filter_map(|(i, v)| v.as_table().map(|t| (i, t))).collect())
        .unwrap_or_default()
}

/// The string items of a string list, with their index; `None` when the key
/// is absent or not an array.
fn strings<'a>(table: &'a Table, key: &str) -> Option<Vec<(usize, &'a str)>> {
    table
        .get(key)
        .and_then(Value::as_array)
        .map(|items| items.iter().enumerate().filter_map(|(i, v)| v.as_str().map(|s| (i, s))).collect())
}

/// `"maria", "joao", "ana"` (at most a screenful).
fn listing(ids: &[&str]) -> String {
    const MAX: usize = 12;
    let mut s = ids.iter().take(MAX).map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
    if ids.len() > MAX {
        s.push_str(&format!(", … ({} in all)", ids.len()));
    }
    s
}

fn unknown(what: &str, name: &str, known: &[&str]) -> String {
    let hint = suggest(name, known).map(|s| format!("; did you mean {s:?}?")).unwrap_or_default();
    if known.is_empty() {
        format!("unknown {what} {name:?} (no {what}s are configured)")
    } else {
        format!("unknown {what} {name:?}{hint} (known {what}s: {})", listing(known))
    }
}

/// Appends every cross-entry problem of `root` to `out`.
pub(crate) fn cross_check(root: &Table, out: &mut Vec<String>) {
    let agents: Vec<AgentEntry> = entries(root, "agents")
        .into_iter()
        .map(|(index, table)| AgentEntry {
            index,
            table,
            id: table.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()),
        })
        .collect();
    let groups: Vec<GroupEntry> = entries(root, "groups")
        .into_iter()
        .map(|(index, table)| GroupEntry {
            index,
            table,
            id: table.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()),
        })
        .collect();

    check_agents(&agents, out);
    check_groups(&groups, &agents, out);
    check_redirects(&groups, root.contains_key("caller_lookup"), out);
    check_routing_cycles(&groups, out);
    check_nats_subjects(root, &groups, out);
    check_ha(root, out);
}

/// A hot-standby pair hands over what its outbox holds: it needs one (a
/// sink other than JSON lines on stdout), and the PBX name as the lease's
/// default key must be a valid key.
fn check_ha(root: &Table, out: &mut Vec<String>) {
    let Some(ha) = root.get("ha").and_then(Value::as_table) else { return };
    let durable = entries(root, "sinks").iter().any(|(_, sink)| {
        let stdout = sink.get("type").and_then(Value::as_str) == Some("jsonl")
            && sink.get("path").and_then(Value::as_str).unwrap_or("-") == "-";
        !stdout
    });
    if !durable {
        out.push(
            "ha: a hot standby takes over the leader's deliveries from its outbox; configure a sink other than \
             JSON lines on stdout"
                .to_string(),
        );
    }
    if !ha.contains_key("key") {
        let pbx = root.get("pbx").and_then(Value::as_table).and_then(|p| p.get("name")).and_then(Value::as_str);
        if let Some(Err(why)) = pbx.map(super::schema::check_kv_key) {
            out.push(format!("pbx.name: the lease's key when [ha] sets none: {why}; set ha.key"));
        }
    }
}

/// A NATS sink's subject puts the PBX name and group ids in as tokens:
/// they must not split the subject or act as wildcards.
fn check_nats_subjects(root: &Table, groups: &[GroupEntry], out: &mut Vec<String>) {
    for (index, sink) in entries(root, "sinks") {
        if sink.get("type").and_then(Value::as_str) != Some("nats") {
            continue;
        }
        let subject = sink.get("subject").and_then(Value::as_str).unwrap_or("callbridge.{pbx}.{type}");
        let pbx = root.get("pbx").and_then(Value::as_table).and_then(|p| p.get("name")).and_then(Value::as_str);
        if let Some(name) = pbx.filter(|_| subject.split('.').any(|t| t == "{pbx}")) {
            if let Err(why) = super::schema::check_subject_token(name) {
                out.push(format!("pbx.name: used as a token of sinks[{index}].subject: {why}"));
            }
        }
        if subject.split('.').any(|t| t == "{group}") {
            for g in groups {
                if let Some(Err(why)) = g.id.map(super::schema::check_subject_token) {
                    out.push(format!("groups[{}].id: used as a token of sinks[{index}].subject: {why}", g.index));
                }
            }
        }
    }
}

/// The keys of a group that redirect callers by who they are.
const REDIRECT_KEYS: [&str; 2] = ["redirect_unknown_to", "redirect_inactive_to"];

/// `redirect_unknown_to` / `redirect_inactive_to`: a known group other
/// than this one, and a `[caller_lookup]` to tell who is calling.
fn check_redirects(groups: &[GroupEntry], have_lookup: bool, out: &mut Vec<String>) {
    let group_ids: Vec<&str> = {
        let mut seen = HashSet::new();
        groups.iter().filter_map(|g| g.id).filter(|id| seen.insert(*id)).collect()
    };
    for g in groups {
        let i = g.index;
        for key in REDIRECT_KEYS {
            let Some(target) = g.table.get(key).and_then(Value::as_str).filter(|t| !t.is_empty()) else {
                continue;
            };
            if Some(target) == g.id {
                out.push(format!("groups[{i}].{key}: group {target:?} redirects to itself"));
            } else if !group_ids.contains(&target) {
                out.push(format!("groups[{i}].{key}: {}", unknown("group", target, &group_ids)));
            }
            if !have_lookup {
                out.push(format!(
                    "groups[{i}].{key}: needs a [caller_lookup] section to tell who is calling (none is configured)"
                ));
            }
        }
    }
}

fn check_agents(agents: &[AgentEntry], out: &mut Vec<String>) {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut extensions: HashMap<&str, &AgentEntry> = HashMap::new();
    for a in agents {
        let i = a.index;
        let who = match a.id {
            Some(id) => format!("agent {id:?} (agents[{i}])"),
            None => format!("agents[{i}]"),
        };
        if let Some(id) = a.id {
            match ids.get(id) {
                Some(first) => {
                    out.push(format!("agents[{i}].id: duplicate agent id {id:?} (first defined at agents[{first}])"))
                }
                None => {
                    ids.insert(id, i);
                }
            }
        }
        match a.table.get("extension") {
            None => out.push(format!("agents[{i}].extension: {who} has no extension; every agent needs one")),
            Some(ext) => {
                if let Some(ext) = ext.as_str().filter(|e| !e.is_empty()) {
                    match extensions.get(ext) {
                        Some(first) => out.push(format!(
                            "agents[{i}].extension: extension {ext:?} of {who} is also the extension of {}",
                            match first.id {
                                Some(id) => format!("agent {id:?} (agents[{}])", first.index),
                                None => format!("agents[{}]", first.index),
                            }
                        )),
                        None => {
                            extensions.insert(ext, a);
                        }
                    }
                }
            }
        }
    }
}

fn check_groups(groups: &[GroupEntry], agents: &[AgentEntry], out: &mut Vec<String>) {
    let agent_ids: Vec<&str> = {
        let mut seen = HashSet::new();
        agents.iter().filter_map(|a| a.id).filter(|id| seen.insert(*id)).collect()
    };
    let group_ids: Vec<&str> = {
        let mut seen = HashSet::new();
        groups.iter().filter_map(|g| g.id).filter(|id| seen.insert(*id)).collect()
    };
    let agent_set: HashSet<&str> = agent_ids.iter().copied().collect();
    let group_set: HashSet<&str> = group_ids.iter().copied().collect();

    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut queues: HashMap<&str, &GroupEntry> = HashMap::new();
    for g in groups {
        let i = g.index;
        let name = g.id.map(|id| format!("group {id:?}")).unwrap_or_else(|| "this group".into());

        if let Some(id) = g.id {
            match ids.get(id) {
                Some(first) => {
                    out.push(format!("groups[{i}].id: duplicate group id {id:?} (first defined at groups[{first}])"))
                }
                None => {
                    ids.insert(id, i);
                }
            }
        }

        if let Some(queue) = g.table.get("queue").and_then(Value::as_str).filter(|q| !q.is_empty()) {
            match queues.get(queue) {
                Some(first) => out.push(format!(
                    "groups[{i}].queue: queue {queue:?} already serves {} (groups[{}]); a queue serves one group",
                    first.id.map(|id| format!("group {id:?}")).unwrap_or_else(|| "another group".into()),
                    first.index
                )),
                None => {
                    queues.insert(queue, g);
                }
            }
        }

        match g.table.get("agents") {
            None => out.push(format!("groups[{i}].agents: missing: {name} has no agents; a group needs at least one")),
            Some(Value::Array(a)) if a.is_empty() => {
                out.push(format!("groups[{i}].agents: {name} has no agents; a group needs at least one"))
            }
            _ => {}
        }

        for (list, what) in [("agents", "agent"), ("admins", "agent")] {
            let mut seen = HashSet::new();
            for (j, a) in strings(g.table, list).unwrap_or_default() {
                if !agent_set.contains(a) {
                    out.push(format!("groups[{i}].{list}[{j}]: {}", unknown(what, a, &agent_ids)));
                } else if !seen.insert(a) {
                    out.push(format!("groups[{i}].{list}[{j}]: agent {a:?} is listed twice"));
                }
            }
        }

        let mut seen = HashSet::new();
        for (j, o) in strings(g.table, "overflow").unwrap_or_default() {
            if Some(o) == g.id {
                out.push(format!("groups[{i}].overflow[{j}]: {name} overflows to itself"));
            } else if !group_set.contains(o) {
                out.push(format!("groups[{i}].overflow[{j}]: {}", unknown("group", o, &group_ids)));
            } else if !seen.insert(o) {
                out.push(format!("groups[{i}].overflow[{j}]: group {o:?} is listed twice"));
            }
        }
    }
}

/// Reports one cycle per strongly connected component of the routing
/// graph: overflow lists and redirects (self-loops are reported on their
/// own by `check_groups` and `check_redirects`). A call routed along such a
/// cycle would come back to where it started.
fn check_routing_cycles(groups: &[GroupEntry], out: &mut Vec<String>) {
    // Nodes: the first group with each id, in configuration order.
    let mut node_of: HashMap<&str, usize> = HashMap::new();
    let mut nodes: Vec<&GroupEntry> = Vec::new();
    for g in groups {
        if let Some(id) = g.id {
            if !node_of.contains_key(id) {
                node_of.insert(id, nodes.len());
                nodes.push(g);
            }
        }
    }
    // Edges, keeping the field of each hop for the message.
    let edges: Vec<Vec<(String, usize)>> = nodes
        .iter()
        .enumerate()
        .map(|(n, g)| {
            let mut seen = HashSet::new();
            let overflow = strings(g.table, "overflow")
                .unwrap_or_default()
                .into_iter()
                .map(|(j, o)| (format!("overflow[{j}]"), o));
            let redirects = REDIRECT_KEYS
                .iter()
                .filter_map(|k| g.table.get(*k).and_then(Value::as_str).map(|t| (k.to_string(), t)));
            overflow
                .chain(redirects)
                .filter_map(|(field, o)| node_of.get(o).map(|&m| (field, m)))
                .filter(|(_, m)| *m != n && seen.insert(*m))
                .collect()
        })
        .collect();
    let targets: Vec<Vec<(usize, usize)>> =
        edges.iter().map(|e| e.iter().enumerate().map(|(k, (_, m))| (k, *m)).collect()).collect();

    for component in strongly_connected(&targets) {
        if component.len() < 2 {
            continue;
        }
        let start = component.iter().copied().min().unwrap_or(0);
        let members: HashSet<usize> = component.iter().copied().collect();
        let Some(cycle) = shortest_cycle(start, &targets, &members) else {
            continue;
        };
        let names: Vec<&str> = cycle.iter().map(|&n| nodes.get(n).and_then(|g| g.id).unwrap_or("?")).collect();
        let hops: Vec<&str> = cycle
            .iter()
            .zip(cycle.iter().skip(1))
            .filter_map(|(&from, &to)| edges.get(from)?.iter().find(|(_, m)| *m == to).map(|(field, _)| field.as_str()))
            .collect();
        let field = hops.first().copied().unwrap_or("overflow[0]");
        if hops.iter().all(|h| h.starts_with("overflow")) {
            out.push(format!(
                "groups[{}].{field}: overflow cycle {} (a diverted call would come back to where it started)",
                nodes.get(start).map_or(0, |g| g.index),
                names.join(" → ")
            ));
        } else {
            out.push(format!(
                "groups[{}].{field}: routing cycle {} through overflow and redirects ({}; a routed call would come back to where it started)",
                nodes.get(start).map_or(0, |g| g.index),
                names.join(" → "),
                hops.join(", ")
            ));
        }
    }
}

/// The edges out of `node` (none for a node that does not exist).
fn out_edges(edges: &[Vec<(usize, usize)>], node: usize) -> &[(usize, usize)] {
    edges.get(node).map_or(&[], Vec::as_slice)
}

/// Marks `node` seen; false when it already was (or does not exist).
fn mark(seen: &mut [bool], node: usize) -> bool {
    match seen.get_mut(node) {
        Some(s) if !*s => {
            *s = true;
            true
        }
        _ => false,
    }
}

/// Kosaraju's algorithm, iterative (no recursion depth tied to the input).
fn strongly_connected(edges: &[Vec<(usize, usize)>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let mut order = Vec::with_capacity(n);
    let mut visited = vec![false; n];
    for root in 0..n {
        if !mark(&mut visited, root) {
            continue;
        }
        let mut stack = vec![(root, 0usize)];
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&(_, m)) = out_edges(edges, node).get(*next) {
                *next += 1;
                if mark(&mut visited, m) {
                    stack.push((m, 0));
                }
            } else {
                order.push(node);
                stack.pop();
            }
        }
    }
    let mut reverse = vec![Vec::new(); n];
    for (from, out) in edges.iter().enumerate() {
        for &(_, to) in out {
            if let Some(r) = reverse.get_mut(to) {
                r.push(from);
            }
        }
    }
    let mut assigned = vec![false; n];
    let mut components = Vec::new();
    for &root in order.iter().rev() {
        if !mark(&mut assigned, root) {
            continue;
        }
        let mut members = vec![root];
        let mut stack = vec![root];
        while let Some(node) = stack.pop() {
            for &m in reverse.get(node).map_or(&[][..], Vec::as_slice) {
                if mark(&mut assigned, m) {
                    members.push(m);
                    stack.push(m);
                }
            }
        }
        members.sort_unstable();
        components.push(members);
    }
    components
}

/// The shortest path `start → … → start` inside `members` (breadth first).
fn shortest_cycle(start: usize, edges: &[Vec<(usize, usize)>], members: &HashSet<usize>) -> Option<Vec<usize>> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for &(_, m) in out_edges(edges, node) {
            if !members.contains(&m) {
                continue;
            }
            if m == start {
                let mut cycle = vec![node];
                let mut at = node;
                while at != start {
                    at = *parent.get(&at)?;
                    cycle.push(at);
                }
                cycle.reverse();
                cycle.push(start);
                return Some(cycle);
            }
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(m) {
                e.insert(node);
                queue.push_back(m);
            }
        }
    }
    None
}
