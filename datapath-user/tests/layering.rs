//! The module graph of the library, read from its sources: no module
//! imports another in a circle, the shared vocabulary depends on nothing,
//! the API knows nothing of the agent, and the CNI plugin is a client of
//! the API and never reaches into the agent.
//!
//! A module's dependencies are the modules its paths name (`crate::…`,
//! `super::…`, in `use` items and in code), outside its `#[cfg(test)]`
//! module and its comments. Nodes are the top-level modules and their
//! children (`agent`, `agent::lifecycle`, …); a module naming its own
//! parent or child is not an edge (a parent re-exports its children).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Which top-level modules each top-level module may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("error", &[]),
    ("cgroup", &[]),
    ("metrics", &["model"]),
    ("api", &["model", "metrics"]),
    ("store", &["model"]),
    ("net", &["model"]),
    ("datapath", &["model", "metrics"]),
    ("cluster", &["model"]),
    (
        "agent",
        &[
            "model", "error", "cgroup", "api", "store", "net", "datapath", "metrics", "cluster",
        ],
    ),
    ("cni", &["model", "error", "api", "net"]),
    ("cli", &["model", "api", "agent", "cluster"]),
];

type Module = Vec<String>;

/// Every module of the library (not the binaries) and its file.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap_or_else(|e| panic!("read {}: {e}", dir.display())))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if prefix.is_empty() && name == "bin" {
                    continue;
                }
                let mut sub = prefix.to_vec();
                sub.push(name);
                walk(&path, &sub, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut m = prefix.to_vec();
                if stem != "mod" && stem != "lib" {
                    m.push(stem.to_owned());
                }
                out.insert(m, path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, &[], &mut out);
    out
}

/// The source without comments and without the trailing
/// `#[cfg(test)]` module.
fn code_of(text: &str) -> String {
    let text = match text.find("\n#[cfg(test)]\n") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads an identifier at the start of `s`.
fn ident(s: &str) -> Option<(&str, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], &s[end..]))
}

/// The paths a `use` tree or path starting at `s` names, each as its
/// segments (`{a::{b, c}, d}` gives `a::b`, `a::c`, `d`).
fn paths(s: &str, prefix: &[String], out: &mut Vec<Module>) {
    let s = s.trim_start();
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    paths(&group[start..i], prefix, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    paths(&group[start..i], prefix, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let Some((name, rest)) = ident(s) else {
        if !prefix.is_empty() {
            out.push(prefix.to_vec());
        }
        return;
    };
    let mut path = prefix.to_vec();
    path.push(name.to_owned());
    match rest.trim_start().strip_prefix("::") {
        Some(rest) => paths(rest, &path, out),
        None => out.push(path),
    }
}

/// The modules `code` (of module `me`) names, resolved against `known`
/// to at most two levels.
fn dependencies(me: &Module, code: &str, known: &BTreeSet<Module>) -> BTreeSet<Module> {
    let mut named = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        paths(&code[i + "crate::".len()..], &[], &mut named);
    }
    for (i, _) in code.match_indices("super::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut base = me.clone();
        let mut rest = &code[i..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        paths(rest, &base, &mut named);
    }
    named
        .into_iter()
        .filter_map(|path| {
            let path: Module = path.into_iter().filter(|s| s != "self").collect();
            (1..=path.len().min(2))
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|m| known.contains(m))
        })
        .collect()
}

/// The graph of modules up to two levels deep, without edges between a
/// module and its own ancestors or descendants.
fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = modules(src);
    let known: BTreeSet<Module> = files.keys().filter(|m| !m.is_empty()).cloned().collect();
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, path) in &files {
        if m.is_empty() {
            continue;
        }
        let node: Module = m.iter().take(2).cloned().collect();
        let text =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let deps = dependencies(m, &code_of(&text), &known);
        let entry = graph.entry(node.clone()).or_default();
        for d in deps {
            let related = d.starts_with(&node) || node.starts_with(&d);
            if !related {
                entry.insert(d);
            }
        }
    }
    graph
}

fn name(m: &Module) -> String {
    m.join("::")
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut c = stack[i..].to_vec();
            c.push(m.clone());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.clone());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules each top-level module uses.
fn top_level(graph: &BTreeMap<Module, BTreeSet<Module>>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in graph {
        let entry = out.entry(m[0].clone()).or_default();
        entry.extend(deps.iter().map(|d| d[0].clone()).filter(|d| *d != m[0]));
    }
    out
}

#[test]
fn no_module_imports_another_in_a_circle() {
    let graph = graph(&src());
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    if let Some(c) = cycle(&graph) {
        panic!(
            "modules import each other in a circle: {}",
            c.iter().map(name).collect::<Vec<_>>().join(" -> ")
        );
    }
}

#[test]
fn each_layer_uses_only_the_layers_below_it() {
    let graph = graph(&src());
    let used = top_level(&graph);
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    for (module, deps) in &used {
        let Some(ok) = allowed.get(module.as_str()) else {
            panic!("module {module} is not in ALLOWED: say what it may use");
        };
        let extra: Vec<_> = deps.iter().filter(|d| !ok.contains(&d.as_str())).collect();
        assert!(
            extra.is_empty(),
            "{module} uses {extra:?}, but may use only {ok:?}"
        );
    }
    // The rules are checked against something: the agent uses most
    // layers, the plugin the API.
    assert!(used["agent"].contains("datapath") && used["agent"].contains("net"));
    assert!(used["cni"].contains("api"));
}

#[test]
fn the_scanner_sees_use_trees_and_relative_paths() {
    let known: BTreeSet<Module> = [
        vec!["agent"],
        vec!["agent", "lifecycle"],
        vec!["agent", "publish"],
        vec!["api"],
        vec!["model"],
        vec!["model", "mac"],
    ]
    .into_iter()
    .map(|m| m.into_iter().map(str::to_owned).collect())
    .collect();
    let me: Module = vec!["agent".into(), "lifecycle".into()];
    let code = "use super::{AgentError, publish::check};\n\
                use crate::{api::{self, Status}, model::mac::format_mac};\n\
                fn f() { crate::model::names::x(); }";
    let deps: Vec<String> = dependencies(&me, code, &known).iter().map(name).collect();
    assert_eq!(
        deps,
        ["agent", "agent::publish", "api", "model", "model::mac"]
    );
    assert_eq!(
        code_of("use a;\n// use crate::x;\n#[cfg(test)]\nmod tests {}"),
        "use a;\n"
    );
}
