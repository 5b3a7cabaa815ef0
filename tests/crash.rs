//! Crash safety: `kill -9` at random moments of a sync, 100 times. The mock alternates between
//! two large lists A and B (disjoint, 20k addresses each, so that a sync replaces every element
//! and the apply takes measurable time); each round starts the daemon, which restores, fetches
//! the other list and applies it, and kills it after a random delay spread over that whole
//! span. After every kill the kernel set must be exactly A or exactly B, never a mix (the apply
//! is one nftables transaction), and the state file must parse (it is replaced atomically).
//! At the end a clean start converges to the list being served.

mod common;

use std::time::{Duration, Instant};

use allowsync::prefixes::AllowSet;
use allowsync::state::StateFile;
use common::daemon::{Setup, setup_with, wait_child};
use rand::Rng;

const KEY: &str = "crash-test-secret-key";
const ROUNDS: usize = 100;
const SIZE: u32 = 20_000;

/// `SIZE` single addresses, every other one so that none merge: A in 10.0.0.0/8, B in 10.128.0.0/9.
fn list(base: u32) -> Vec<String> {
    (0..SIZE).map(|i| std::net::Ipv4Addr::from(base + 2 * i).to_string()).collect()
}

fn as_set(v: &[String]) -> AllowSet {
    AllowSet::from_nets(v.iter().map(|s| allowsync::prefixes::parse_entry(s).unwrap().net))
}

#[test]
fn kill_9_at_random_moments_leaves_old_or_new_never_a_mix() {
    let (a, b) = (list(0x0a00_0000), list(0x0a80_0000));
    let (set_a, set_b) = (as_set(&a), as_set(&b));
    let lists = [(5, a.clone()), (6, Vec::new())].into();
    // Every sync replaces the whole list: the mass-removal guard would (rightly) refuse that.
    let Some(env) = setup_with(Setup::new(KEY, lists), |y| {
        y.push_str("safety: { max_removal_percent: 100 }\n");
    }) else {
        return;
    };
    let first = env.once(Duration::from_secs(30));
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    assert_eq!(env.kernel(), set_a);

    // How long a start with a full replace takes here, to spread the kills over it.
    env.mock.set_list(5, b.clone());
    let d = env.spawn();
    let t = Instant::now();
    env.wait_kernel(&set_b, Duration::from_secs(30));
    env.wait_syncs(0, Duration::from_secs(10));
    let span = t.elapsed();
    let _ = wait_child(d, Duration::ZERO);
    eprintln!("a start with a full replace of {SIZE} addresses: {span:?}");

    let mut rng = rand::rng();
    let (mut seen_a, mut seen_b) = (0, 0);
    let started = Instant::now();
    for round in 0..ROUNDS {
        env.mock.set_list(5, if round % 2 == 0 { a.clone() } else { b.clone() });
        let d = env.spawn();
        // Up to 1.2 times the measured span: some kills land after the sync, most during it.
        let delay = span.mul_f64(rng.random_range(0.0..1.2));
        std::thread::sleep(delay);
        let (code, _, _) = wait_child(d, Duration::ZERO);
        assert_eq!(code, None, "round {round}: the daemon exited on its own; log:\n{}", tail(&env.log()));
        let kernel = env.kernel();
        match () {
            _ if kernel == set_a => seen_a += 1,
            _ if kernel == set_b => seen_b += 1,
            _ => panic!(
                "round {round}: killed after {delay:?}, the kernel holds {} ranges, neither A nor B \
                 ({} of A, {} of B); log:\n{}",
                kernel.len(),
                kernel.v4.iter().filter(|r| set_a.v4.covers(r)).count(),
                kernel.v4.iter().filter(|r| set_b.v4.covers(r)).count(),
                tail(&env.log())
            ),
        }
        let st = StateFile::new(env.state_path()).peek();
        assert!(matches!(st, Ok(Some(_))), "round {round}: the state file does not parse: {st:?}");
    }
    eprintln!("{ROUNDS} kills in {:?}: kernel was A {seen_a} times, B {seen_b} times", started.elapsed());
    // The kills hit both before and after the apply (otherwise the test proves little).
    assert!(seen_a > 0 && seen_b > 0, "A {seen_a}, B {seen_b}");

    // And a clean start converges. The kernel may hold A already (the last kill came before its
    // apply): wait for the sync line too, so that SIGTERM does not arrive before the daemon
    // handles it.
    env.mock.set_list(5, a.clone());
    let n = env.syncs();
    let d = env.spawn();
    env.wait_kernel(&set_a, Duration::from_secs(30));
    env.wait_syncs(n, Duration::from_secs(30));
    common::daemon::stop(d);
}

/// The end of a log that grows over 100 rounds.
fn tail(log: &str) -> &str {
    let mut i = log.len().saturating_sub(6000);
    while !log.is_char_boundary(i) {
        i += 1;
    }
    &log[i..]
}
