use std::fs;

use super::*;
use crate::model::Limit;

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("dpt-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn container(name: &str, id: u32, addr: Ipv4Addr, ports: &[&str]) -> Container {
    Container {
        id,
        name: name.into(),
        netns: "/var/run/netns/x".into(),
        netns_id: Some(NetnsId {
            dev: 4,
            ino: 4026531840 + u64::from(id),
        }),
        ifname: "eth0".into(),
        host_ifname: format!("dp{id:x}"),
        addr,
        publish: ports.iter().map(|p| p.parse().expect("valid")).collect(),
        mac: "02:00:00:00:00:01".into(),
        cgroup: Some(format!("/sys/fs/cgroup/unified/{name}").into()),
        cgroup_id: 4242 + u64::from(id),
        limits: RateLimits {
            egress: Some(Limit::given(10_000_000, 65_536)),
            ingress: None,
        },
        mtu: Some(1400),
    }
}

fn m(spec: &str) -> PortMapping {
    spec.parse().expect("valid")
}

/// Adds container `name` with `ports` through `store`, as the agent does.
fn add(store: &mut Store, name: &str, ports: &[&str]) -> Container {
    let pool: Ipv4Net = "198.19.0.0/24".parse().expect("valid");
    let (id, addr) = store.allocate(pool).expect("a free address");
    let c = container(name, id, addr, ports);
    store
        .commit(vec![Change::Put(Box::new(c.clone()))])
        .expect("commit");
    c
}

fn journal_files(dir: &Path) -> Vec<PathBuf> {
    journal::files(dir).expect("list")
}

#[test]
fn a_state_file_without_cgroups_or_limits_still_loads() {
    let old = r#"{"next_id": 2, "containers": {"web": {"id": 1, "name": "web",
        "netns": "/var/run/netns/x", "ifname": "eth0", "host_ifname": "dp1",
        "addr": "198.19.0.2", "publish": []}}}"#;
    let st: State = serde_json::from_str(old).expect("an older state file loads");
    let c = &st.containers["web"];
    assert_eq!((&c.cgroup, c.cgroup_id), (&None, 0));
    assert!(c.limits.is_empty());
}

#[test]
fn a_node_upgrading_from_the_single_state_file_keeps_its_containers() {
    let dir = TempDir::new("upgrade");
    fs::create_dir_all(&dir.0).expect("mkdir");
    // What the previous version wrote: one pretty-printed file.
    let old = r#"{
  "next_id": 3,
  "containers": {
    "web": {"id": 1, "name": "web", "netns": "/var/run/netns/a", "ifname": "eth0",
            "host_ifname": "dp1", "addr": "198.19.0.2",
            "publish": [{"host_port": 8080, "container_port": 80, "count": 1, "protocol": "tcp"}],
            "mac": "02:00:00:00:00:01"},
    "db": {"id": 2, "name": "db", "netns": "/var/run/netns/b", "ifname": "eth0",
           "host_ifname": "dp2", "addr": "198.19.0.3", "publish": [], "mac": "02:00:00:00:00:02"}
  }
}"#;
    fs::write(dir.0.join(STATE_FILE), old).expect("write");
    let mut store = Store::open(&dir.0).expect("the old file opens");
    assert_eq!(store.containers().len(), 2);
    assert_eq!(store.get("web").expect("web").publish, [m("8080:80")]);
    store
        .commit(vec![Change::Publish {
            name: "db".into(),
            ports: vec![m("5432:5432")],
        }])
        .expect("commit");
    let expected = store.state().clone();
    drop(store);
    let store = Store::open(&dir.0).expect("reopen");
    assert_eq!(store.state(), &expected);
    // Ids go on where the old file left them.
    assert_eq!(store.state().next_id(), 3);
}

#[test]
fn every_kind_of_change_survives_a_restart() {
    let dir = TempDir::new("kinds");
    let mut store = Store::open(&dir.0).expect("open");
    add(&mut store, "web", &["8080:80", "8443:443"]);
    let db = add(&mut store, "db", &[]);
    add(&mut store, "gone", &["7000:7000/udp"]);
    store
        .commit(vec![
            Change::Publish {
                name: "db".into(),
                ports: vec![m("5432:5432"), m("5433:5433")],
            },
            Change::Unpublish {
                name: "web".into(),
                ports: vec![m("8443:443")],
            },
        ])
        .expect("commit");
    store
        .commit(vec![Change::Limits {
            name: "db".into(),
            limits: RateLimits::default(),
        }])
        .expect("commit");
    store
        .commit(vec![Change::Remove {
            name: "gone".into(),
        }])
        .expect("commit");
    let expected = store.state().clone();
    drop(store);

    let store = Store::open(&dir.0).expect("reopen");
    assert_eq!(store.state(), &expected);
    let names: Vec<&String> = store.containers().keys().collect();
    assert_eq!(names, ["db", "web"]);
    assert_eq!(store.get("web").expect("web").publish, [m("8080:80")]);
    let db_now = store.get("db").expect("db");
    assert_eq!(db_now.publish, [m("5432:5432"), m("5433:5433")]);
    assert!(db_now.limits.is_empty());
    assert_eq!(store.state().name_of(db.id), Some("db"));
    // The indexes are rebuilt too: the removed container's port is free,
    // the others' are taken.
    assert!(store.state().ports().overlap(&m("7000:1/udp")).is_none());
    assert_eq!(
        store.state().ports().overlap(&m("5433:1")).map(|(o, _)| o),
        Some("db")
    );
}

#[test]
fn a_cgroup_that_goes_and_comes_back_moves_the_limits_index_and_survives_a_restart() {
    let dir = TempDir::new("cgroup");
    let mut store = Store::open(&dir.0).expect("open");
    let web = add(&mut store, "web", &[]);
    let path = web.cgroup.clone().expect("a cgroup");
    // Gone: its limits are pending, still held by the path.
    store
        .commit(vec![Change::Cgroup {
            name: "web".into(),
            cgroup_id: 0,
        }])
        .expect("commit");
    assert!(store.get("web").expect("web").limits_pending());
    assert_eq!(store.state().limiting(web.cgroup_id), None);
    assert_eq!(store.state().limiting_path(&path), Some("web"));
    // Another container's limits on the same directory are refused, even
    // while it does not exist.
    let pool: Ipv4Net = "198.19.0.0/24".parse().expect("valid");
    let (id, addr) = store.allocate(pool).expect("a free address");
    let mut other = container("other", id, addr, &[]);
    other.cgroup = Some(path.clone());
    other.cgroup_id = 0;
    let err = store
        .commit(vec![Change::Put(Box::new(other))])
        .expect_err("refused");
    assert!(err.to_string().contains("both limit cgroup"), "{err}");
    // Back, recreated with a new id.
    store
        .commit(vec![Change::Cgroup {
            name: "web".into(),
            cgroup_id: 777,
        }])
        .expect("commit");
    drop(store);

    let store = Store::open(&dir.0).expect("reopen");
    let now = store.get("web").expect("web");
    assert_eq!(now.cgroup_id, 777);
    assert!(!now.limits_pending());
    assert_eq!(store.state().limiting(777), Some("web"));
    assert_eq!(store.state().limiting(web.cgroup_id), None);
    assert_eq!(
        store.state().limited_cgroups().collect::<Vec<_>>(),
        [path.as_path()]
    );
}

#[test]
fn one_change_appends_one_record_and_rewrites_nothing() {
    let dir = TempDir::new("o1");
    let mut store = Store::open(&dir.0).expect("open");
    let ports: Vec<String> = (0..2000).map(|i| format!("{}:80", 20_000 + i)).collect();
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    add(&mut store, "big", &ports);
    add(&mut store, "small", &[]);
    let snapshot = dir.0.join(STATE_FILE);
    let snapshot_before = fs::metadata(&snapshot).map(|m| m.len()).ok();
    let files = journal_files(&dir.0);
    assert_eq!(files.len(), 1);
    let before = fs::metadata(&files[0]).expect("journal").len();
    store
        .commit(vec![Change::Publish {
            name: "small".into(),
            ports: vec![m("9999:80")],
        }])
        .expect("commit");
    let grown = fs::metadata(&files[0]).expect("journal").len() - before;
    // One small record: not the 2,000 ports of the other container.
    assert!(grown < 200, "one port took {grown} bytes");
    assert_eq!(
        fs::metadata(&snapshot).map(|m| m.len()).ok(),
        snapshot_before
    );
}

#[test]
fn the_journal_is_compacted_into_the_snapshot() {
    let dir = TempDir::new("compact");
    let mut store = Store::open(&dir.0).expect("open");
    let ports: Vec<String> = (0..1000).map(|i| format!("{}:80", 10_000 + i)).collect();
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    // ~60 KB a record: past 1 MiB after ~20.
    for i in 0..40 {
        let c = add(&mut store, &format!("c{i}"), &ports);
        store
            .commit(vec![Change::Remove { name: c.name }])
            .expect("remove");
    }
    add(&mut store, "last", &["8080:80"]);
    store.journal.wait();
    assert!(
        journal_files(&dir.0).len() <= 2,
        "{:?}",
        journal_files(&dir.0)
    );
    let (snap, seq) = StateStore::new(&dir.0).load().expect("snapshot");
    assert!(seq > 0, "a snapshot was written");
    assert!(snap.containers().len() <= 1);
    let expected = store.state().clone();
    drop(store);
    assert_eq!(Store::open(&dir.0).expect("reopen").state(), &expected);
}

#[test]
fn a_torn_last_record_is_dropped_and_earlier_ones_kept() {
    let dir = TempDir::new("torn");
    let mut store = Store::open(&dir.0).expect("open");
    add(&mut store, "web", &["8080:80"]);
    let path = journal_files(&dir.0).pop().expect("a journal file");
    drop(store);
    // A record cut off in the middle of its payload.
    let mut bytes = fs::read(&path).expect("read");
    let whole = bytes.len();
    bytes.extend_from_slice(&100u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(b"{\"seq\":2,");
    fs::write(&path, &bytes).expect("write");
    let store = Store::open(&dir.0).expect("a torn tail is not corruption");
    assert_eq!(
        store.containers().keys().collect::<Vec<_>>(),
        [&"web".to_owned()]
    );
    drop(store);
    // The same bytes in the middle of the journal are damage.
    let dir2 = TempDir::new("torn-middle");
    let mut store = Store::open(&dir2.0).expect("open");
    add(&mut store, "web", &["8080:80"]);
    add(&mut store, "db", &[]);
    let path = journal_files(&dir2.0).pop().expect("a journal file");
    drop(store);
    let mut bytes = fs::read(&path).expect("read");
    bytes[whole - 3] ^= 0xff;
    fs::write(&path, &bytes).expect("write");
    let err = Store::open(&dir2.0).expect_err("corrupt");
    assert!(matches!(err, StateError::CorruptJournal { .. }), "{err}");
    assert!(
        err.to_string().contains("move the journal files away"),
        "{err}"
    );
}

#[test]
fn a_change_that_does_not_apply_writes_nothing() {
    let dir = TempDir::new("refused");
    let mut store = Store::open(&dir.0).expect("open");
    add(&mut store, "web", &["8080:80"]);
    let db = add(&mut store, "db", &[]);
    let path = journal_files(&dir.0).pop().expect("a journal file");
    let len = fs::metadata(&path).expect("journal").len();
    let before = store.state().clone();
    // The second change overlaps a port of another container: the first
    // one is not applied either.
    let err = store
        .commit(vec![
            Change::Limits {
                name: "db".into(),
                limits: RateLimits::default(),
            },
            Change::Publish {
                name: "db".into(),
                ports: vec![m("8080:1")],
            },
        ])
        .expect_err("refused");
    assert!(matches!(err, StateError::Refused { .. }), "{err}");
    assert_eq!(store.state(), &before);
    assert_eq!(fs::metadata(&path).expect("journal").len(), len);
    assert!(!store.get("db").expect("db").limits.is_empty());
    assert_eq!(store.state().limiting(db.cgroup_id), Some("db"));
}

#[test]
fn addresses_are_never_handed_out_twice() {
    let dir = TempDir::new("addrs");
    let pool: Ipv4Net = "198.19.0.0/29".parse().expect("valid");
    let mut store = Store::open(&dir.0).expect("open");
    let mut seen = Vec::new();
    while let Some((id, a)) = store.allocate(pool) {
        assert!(!seen.contains(&a));
        assert_ne!(a, gateway_of(pool));
        seen.push(a);
        store
            .commit(vec![Change::Put(Box::new(container(
                &format!("c{id}"),
                id,
                a,
                &[],
            )))])
            .expect("commit");
    }
    // /29: 6 hosts minus the gateway.
    assert_eq!(seen.len(), 5);
    store
        .commit(vec![Change::Remove { name: "c2".into() }])
        .expect("remove");
    assert_eq!(store.allocate(pool).map(|(_, a)| a), Some(seen[1]));
}

#[test]
fn a_truncated_snapshot_is_reported_not_discarded() {
    let dir = TempDir::new("corrupt");
    let mut store = Store::open(&dir.0).expect("open");
    add(&mut store, "web", &["8080:80"]);
    store.compact().expect("compact");
    drop(store);
    let snapshot = StateStore::new(&dir.0);
    let bytes = fs::read(snapshot.path()).expect("read");
    fs::write(snapshot.path(), &bytes[..bytes.len() / 2]).expect("truncate");
    let err = Store::open(&dir.0).expect_err("corrupt");
    assert!(matches!(err, StateError::Corrupt { .. }));
    assert!(err.to_string().contains("corrupt"), "{err}");
    // The file is left for the operator.
    assert_eq!(
        fs::read(snapshot.path()).expect("still there").len(),
        bytes.len() / 2
    );
}

#[test]
fn a_new_id_never_shares_a_live_containers_counter_slot() {
    use datapath_common::monitor::{CONTAINER_SLOTS, slot};
    let mut st = State::default();
    let first = st.take_id();
    st.apply(&Change::Put(Box::new(container(
        "a",
        first,
        Ipv4Addr::new(198, 19, 0, 2),
        &[],
    ))))
    .expect("put");
    st.next_id = first + CONTAINER_SLOTS;
    let id = st.take_id();
    assert_eq!(id, first + CONTAINER_SLOTS + 1, "the busy slot is skipped");
    assert_ne!(slot(id), slot(first));
    // Once the container is gone its slot is free again.
    st.apply(&Change::Remove { name: "a".into() })
        .expect("remove");
    st.next_id = first + 2 * CONTAINER_SLOTS;
    assert_eq!(st.take_id(), first + 2 * CONTAINER_SLOTS);
}

#[test]
fn the_pool_and_masquerade_ports_are_recorded_across_restarts() {
    let dir = TempDir::new("ranges");
    let pool: Ipv4Net = "198.19.0.0/24".parse().expect("valid");
    {
        let mut store = Store::open(&dir.0).expect("open");
        store.set_ranges(pool, (61000, 65535)).expect("record");
        add(&mut store, "web", &["8080:80"]);
        let bytes = |files: Vec<PathBuf>| -> u64 {
            files
                .iter()
                .map(|f| fs::metadata(f).expect("stat").len())
                .sum()
        };
        let before = bytes(journal_files(&dir.0));
        store.set_ranges(pool, (61000, 65535)).expect("unchanged");
        let after = bytes(journal_files(&dir.0));
        assert_eq!(after, before, "the same ranges write nothing");
    }
    // Replayed from the journal, then read back from the snapshot.
    for _ in 0..2 {
        let store = Store::open(&dir.0).expect("reopen");
        assert_eq!(store.state().pool(), Some(pool));
        assert_eq!(store.state().snat_ports(), Some((61000, 65535)));
        assert!(store.get("web").is_some());
    }
}

#[test]
fn a_container_outside_the_recorded_pool_is_refused() {
    let dir = TempDir::new("outside");
    let mut store = Store::open(&dir.0).expect("open");
    add(&mut store, "web", &[]);
    let other: Ipv4Net = "198.18.0.0/24".parse().expect("valid");
    let e = store
        .set_ranges(other, (61000, 65535))
        .expect_err("web's address is not in it");
    assert!(e.to_string().contains("outside the pool"), "{e}");
    let pool: Ipv4Net = "198.19.0.0/24".parse().expect("valid");
    store.set_ranges(pool, (61000, 65535)).expect("record");
    let (id, _) = store.allocate(pool).expect("an id");
    let stray = container("stray", id, Ipv4Addr::new(198, 18, 0, 5), &[]);
    let e = store
        .commit(vec![Change::Put(Box::new(stray))])
        .expect_err("outside the pool");
    assert!(e.to_string().contains("outside the pool"), "{e}");
    store.compact().expect("compact");
    drop(store);
    let snapshot = fs::read_to_string(dir.0.join(STATE_FILE)).expect("read");
    let tampered = snapshot.replace("198.19.0.0/24", "198.18.0.0/24");
    assert_ne!(tampered, snapshot);
    fs::write(dir.0.join(STATE_FILE), tampered).expect("write");
    for f in journal_files(&dir.0) {
        fs::remove_file(f).expect("remove");
    }
    let e = Store::open(&dir.0).expect_err("a snapshot with web outside its pool");
    assert!(e.to_string().contains("outside the pool"), "{e}");
}

#[test]
fn a_rebuilt_state_is_kept_only_where_none_was() {
    let dir = TempDir::new("rebuilt");
    fs::create_dir_all(&dir.0).expect("mkdir");
    let leftover = dir.0.join("journal.0000000004");
    fs::write(&leftover, b"records of a lost state").expect("write");
    assert!(
        !exists(&dir.0),
        "a journal without its snapshot is not the state"
    );
    let pool: Ipv4Net = "198.19.0.0/24".parse().expect("valid");
    let mut rebuilt = State::with_ranges(pool, (61000, 65535));
    rebuilt
        .adopt(container(
            "web",
            7,
            Ipv4Addr::new(198, 19, 0, 9),
            &["8080:80"],
        ))
        .expect("adopt");
    let mut store = Store::create(&dir.0, &rebuilt).expect("create");
    assert!(exists(&dir.0));
    assert_eq!(store.state(), &rebuilt);
    assert!(!leftover.exists(), "set aside, not replayed");
    assert!(dir.0.join("journal.0000000004.lost").exists());
    let (id, addr) = store.allocate(pool).expect("a free address");
    assert!(id > 7, "ids of adopted containers are not handed out again");
    assert_ne!(addr, Ipv4Addr::new(198, 19, 0, 9));
    drop(store);
    assert_eq!(Store::open(&dir.0).expect("reopen").state(), &rebuilt);
    remove_all(&dir.0).expect("remove");
    assert!(!dir.0.exists(), "the set-aside journal goes with the rest");
}
