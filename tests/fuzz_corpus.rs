//! Replays the fuzz corpora through the fuzz targets' entry functions (`allowsync_testkit::fuzzing`,
//! the same functions `make fuzz` drives): the committed seeds in `fuzz/corpus/<target>/` and
//! every crash input kept in `fuzz/regressions/<target>/`. A fixed crash stays fixed, and a
//! change that breaks a parser on a known input fails `make test` without a fuzzer.

use std::path::{Path, PathBuf};

use allowsync_testkit::fuzzing::TARGETS;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

#[test]
fn every_seed_and_regression_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let seeds = inputs(&root.join("corpus").join(name));
        // An empty or missing corpus directory would make this test pass vacuously.
        assert!(seeds.len() >= 5, "fuzz/corpus/{name}/ holds only {} seeds", seeds.len());
        for path in seeds.iter().chain(&inputs(&root.join("regressions").join(name))) {
            let data = std::fs::read(path).unwrap();
            if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(ToString::to_string))
                    .unwrap_or_default();
                failures.push(format!("{name}: {}: {msg}", path.display()));
            }
        }
    }
    assert!(failures.is_empty(), "inputs that fail their fuzz target:\n{}", failures.join("\n"));
}

#[test]
fn the_targets_reject_what_they_must() {
    // The replay is only worth something if the targets check more than "no panic": a seed that
    // parses must also satisfy the target's property. Spot-check that the seeds exercise both
    // the accepting and the rejecting paths of each parser.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let read = |t: &str, f: &str| std::fs::read(root.join(t).join(f)).unwrap();
    let ip_list = |f: &str| {
        allowsync::source::chat::parse_response(&read("get_ip_list", f), 1, "a", &Default::default())
    };
    assert!(ip_list("ok-mixed").is_ok());
    assert!(ip_list("html").is_err());
    // Special entries are skipped, a too wide one refuses the whole answer.
    assert_eq!(ip_list("ok-specials").map(|l| (l.entries, l.skipped)).ok(), Some((2, 11)));
    assert!(ip_list("suspicious-wide").is_err());
    // Every entry of the entry corpus is judged by the rules the target asserts.
    let judged = |f: &str| {
        let e = allowsync::prefixes::parse_entry(std::str::from_utf8(&read("entry", f)).unwrap()).unwrap();
        allowsync::admission::check(e.net, &Default::default())
    };
    assert!(judged("e01").is_ok());
    assert!(judged("e03").is_err() && judged("e21").is_err());
    assert!(allowsync::state::parse(&read("state", "full")).is_ok());
    assert!(allowsync::state::parse(&read("state", "version-2")).is_err());
    let sig = String::from_utf8(read("usersig", "valid-fuzz-key")).unwrap();
    assert!(
        allowsync::usersig::verify(&sig, 1400000000, "administrator", "fuzz-secret-key", 1_700_000_000)
            .is_ok()
    );
    assert!(allowsync::usersig::decode(&String::from_utf8(read("usersig", "not-zlib")).unwrap()).is_err());
}
