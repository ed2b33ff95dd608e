//! Quorums over replicas that may lie: four servers on loopback, at most one faulty.

use super::Home;
use super::replicas::{copy_of_store, same_user};
use super::server::Server;

/// Four servers remembered as `home`'s capsule c's replicas, with at most one faulty.
fn four_servers(home: &Home) -> (String, Vec<Server>) {
    let servers: Vec<Server> = (0..4).map(|_| Server::start()).collect();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    for s in &servers {
        home.ok(&["replica", "add", "c", &s.url()]);
    }
    home.ok(&["replica", "policy", "c", "--faulty", "1"]);
    (id, servers)
}

fn append(home: &Home, text: &str) {
    let f = home.file("record", text.as_bytes());
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
}

#[test]
fn a_policy_needs_3b_plus_1_replicas_and_a_push_needs_a_write_quorum() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let servers: Vec<Server> = (0..3).map(|_| Server::start()).collect();
    for s in &servers {
        home.ok(&["replica", "add", "c", &s.url()]);
    }
    let out = home.run(&["replica", "policy", "c", "--faulty", "1"]);
    assert_eq!(out.status.code(), Some(5), "3 replicas cannot outvote 1 liar: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 4"), "{out:?}");
    let fourth = Server::start();
    home.ok(&["replica", "add", "c", &fourth.url()]);
    home.ok(&["replica", "policy", "c", "--faulty", "1"]);
    let out = home.run(&["replica", "remove", "c", &fourth.url()]);
    assert_eq!(out.status.code(), Some(5), "removing one would break the policy: {out:?}");

    append(&home, "one");
    let pushed = home.ok(&["push", "c"]);
    assert!(pushed.ends_with("4 of 4 replicas answered (quorum 3)\n"), "{pushed}");
    // One down: still a write quorum. Two down: not replicated, exit 6.
    let mut servers = servers;
    drop(servers.pop());
    append(&home, "two");
    let pushed = home.ok(&["push", "c"]);
    assert!(pushed.ends_with("3 of 4 replicas answered (quorum 3)\n"), "{pushed}");
    drop(servers.pop());
    append(&home, "three");
    let out = home.run(&["push", "c"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 of 4 replicas answered, a quorum is 3"), "{out:?}");
}

#[test]
fn a_clone_through_the_quorum_gets_the_newest_state_past_a_rolled_back_server_and_heals_it() {
    let home = Home::default();
    let (id, mut servers) = four_servers(&home);
    append(&home, "old state");
    home.ok(&["push", "c"]);
    // Server 0's store as it is now, put back later: a rollback.
    let (store, addr) = servers.remove(0).kill();
    let old_copy = copy_of_store(&store);
    servers.insert(0, Server::start_on(store, &addr));
    append(&home, "newest state");
    home.ok(&["push", "c"]);
    let (_, addr) = servers.remove(0).kill();
    servers.insert(0, Server::start_on(old_copy, &addr));
    // And server 1 is down.
    drop(servers.remove(1));

    // A fresh clone starting at the rolled-back server still ends at the newest state.
    let laptop = same_user(&home);
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let mut args = vec!["clone".to_owned(), format!("{}#{id}", urls[0]), "--faulty".into(), "1".into()];
    args.extend(
        home.ok(&["replica", "list", "c"])
            .lines()
            .filter(|u| *u != urls[0])
            .flat_map(|u| ["--also".to_owned(), u.to_owned()]),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = laptop.run(&args);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("3 of 4 replicas answered (quorum 3)"), "{said}");
    assert!(said.contains("wrote back 1 records"), "the rolled-back server is healed: {said}");
    assert_eq!(laptop.ok(&["cat", "c", "head:0"]), "newest state");
    laptop.ok(&["verify", "c"]);

    // Server 0 now holds the newest state itself.
    let other = same_user(&home);
    other.ok(&["clone", &format!("{}#{id}", urls[0])]);
    assert_eq!(other.ok(&["cat", "c", "head:0"]), "newest state");
}

#[test]
fn a_restored_backup_that_forks_is_reported_by_every_reader_and_its_evidence_reaches_every_server() {
    let home = Home::default();
    let (id, servers) = four_servers(&home);
    append(&home, "before the backup");
    home.ok(&["push", "c"]);
    // The home restored from a backup: the same keys and device, so its next number is one
    // the original uses too.
    let restored = Home::default();
    super::sh(&format!("cp -a {}/. {}", home.path().display(), restored.path().display()));
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    append(&home, "the original goes on");
    home.ok(&["push", "c", &urls[0], &urls[1]]);
    append(&restored, "the restored copy writes");
    restored.ok(&["push", "c", &urls[2], &urls[3]]);

    // A reader through the quorum meets both branches: exit 7, and the evidence.
    let reader = same_user(&home);
    let out = reader.run(&[
        "clone",
        &format!("{}#{id}", urls[0]),
        "--also",
        &urls[1],
        "--also",
        &urls[2],
        "--also",
        &urls[3],
        "--faulty",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ALARM"), "{out:?}");
    let verify = reader.run(&["verify", "c"]);
    assert_eq!(verify.status.code(), Some(7), "{verify:?}");
    assert_eq!(reader.ok(&["cat", "c", "head:0"]), "the original goes on", "the forked branch is not merged");

    // Every server now holds the evidence, and a reader of any one of them learns it.
    for url in &urls {
        let other = same_user(&home);
        let out = other.run(&["clone", &format!("{url}#{id}"), "--faulty", "0"]);
        assert!(out.status.success(), "{url}: {out:?}");
        let verify = other.run(&["verify", "c"]);
        assert_eq!(verify.status.code(), Some(7), "{url} passed the evidence on: {verify:?}");
    }
}

#[test]
fn a_name_is_bound_once_and_a_client_refuses_a_server_that_answers_another_capsule() {
    let (s0, s1) = (Server::start(), Server::start());
    let alice = Home::default();
    let id = alice.ok(&["create", "c"]).trim().to_owned();
    for s in [&s0, &s1] {
        alice.ok(&["replica", "add", "c", &s.url()]);
    }
    alice.ok(&["push", "c"]);
    let said = alice.ok(&["name", "register", "notes", "--capsule", "c"]);
    assert!(said.ends_with(&format!("notes {id}\n")) && said.matches("bound 'notes'").count() == 2, "{said}");
    alice.ok(&["name", "register", "notes", "--capsule", "c"]); // the same binding again: fine

    // Another creator cannot take the name on either server.
    let mallory = Home::default();
    mallory.ok(&["create", "c"]);
    mallory.ok(&["replica", "add", "c", &s0.url()]);
    let out = mallory.run(&["name", "register", "notes", "--capsule", "c"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bound once"), "{out:?}");

    // Bob resolves it through both servers and pins it.
    let bob = Home::default();
    let out = bob.ok(&["clone", &format!("{}#notes", s0.url()), "--also", &s1.url(), "--name", "notes"]);
    assert!(out.ends_with(&format!("{id}\n")), "{out}");
    // A server that answers the name with another capsule is refused loudly.
    let liar = Server::start();
    mallory.ok(&["replica", "add", "c", &liar.url()]);
    let out = mallory.run(&["name", "register", "notes", "--capsule", "c"]);
    assert_eq!(out.status.code(), Some(5), "still taken on the first server: {out:?}");
    mallory.ok(&["replica", "remove", "c", &s0.url()]);
    mallory.ok(&["name", "register", "notes", "--capsule", "c"]); // free on the new server
    let out = bob.run(&["clone", &format!("{}#notes", liar.url()), "--name", "other"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("first accepted here"), "{out:?}");
}

#[test]
fn two_servers_hiding_a_commit_cannot_make_a_reader_take_the_stale_state_for_the_newest() {
    let home = Home::default();
    let (id, mut servers) = four_servers(&home);
    append(&home, "old state");
    home.ok(&["push", "c"]);
    // Servers 0 and 1 (more than B = 1) will go back to this state together.
    let mut olds = Vec::new();
    for i in 0..2 {
        let (store, addr) = servers.remove(i).kill();
        olds.push((copy_of_store(&store), addr.clone()));
        servers.insert(i, Server::start_on(store, &addr));
    }
    append(&home, "newest state");
    home.ok(&["push", "c"]);
    for (i, (old, addr)) in olds.into_iter().enumerate() {
        drop(servers.remove(i));
        servers.insert(i, Server::start_on(old, &addr));
    }
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let clone_args = |first: usize| -> Vec<String> {
        let mut args = vec!["clone".to_owned(), format!("{}#{id}", urls[first]), "--faulty".into(), "1".into()];
        args.extend(
            urls.iter().enumerate().filter(|(i, _)| *i != first).flat_map(|(_, u)| ["--also".to_owned(), u.clone()]),
        );
        args
    };
    // One honest server down: the other is in every read quorum, and its heads win.
    drop(servers.remove(3));
    let reader = same_user(&home);
    let args = clone_args(0);
    reader.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(reader.ok(&["cat", "c", "head:0"]), "newest state");
    // Both honest servers down: two answers are no quorum, and the reader says so (exit 6)
    // rather than take what the two say for the newest state.
    drop(servers.remove(2));
    let late = same_user(&home);
    let args = clone_args(0);
    let out = late.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 of 4 replicas answered"), "{out:?}");
}

#[test]
fn a_mount_says_when_fewer_replicas_answer_than_a_read_quorum() {
    let home = Home::default();
    let (_, mut servers) = four_servers(&home);
    let Some(m) = super::Mounted::new(&home, "c", &[]) else { return };
    super::write_fsynced(&m.path("a.txt"), b"on four servers");
    let status = || std::fs::read_to_string(m.path(".capsule/status")).unwrap();
    super::background::eventually("all four answer", || {
        status().contains("read_quorum: 4 of 4 replicas answer, a read needs 3")
    });
    assert!(!status().contains("ALARM"), "{}", status());
    // One down is within the policy; two are not.
    let _one = servers.pop().unwrap().kill();
    super::background::eventually("three answer", || status().contains("read_quorum: 3 of 4"));
    assert!(!status().contains("ALARM"), "{}", status());
    let _two = servers.pop().unwrap().kill();
    super::background::eventually("the alarm", || status().contains("ALARM: only 2 of 4 replicas answer"));
}
