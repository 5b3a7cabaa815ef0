//! The contenders: allowsync's backends (this binary re-executed as `__apply BACKEND FILE`),
//! `nft -f` and `ipset restore`, each reset between runs, and the release daemon.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use allowsync::backend::ipset::IpsetBackend;
use allowsync::backend::nftables::NftablesBackend;
use allowsync::backend::{Backend, BackendError};
use allowsync::config::{BackendConfig, IpsetConfig, NftablesConfig};
use allowsync::prefixes::{AllowSet, Delta, Diff, parse_entry};
use ipnet::IpNet;

use crate::entries::Kind;
use crate::measure::{ms, sh, timed};

pub const NFT_TABLE: &str = "bench_nft";
pub const IPSET_V4: &str = "bench_v4";
pub const IPSET_V6: &str = "bench_v6";
pub const MAXELEM: u32 = 4_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Nftables,
    Ipset,
}

impl Which {
    pub fn arg(self) -> &'static str {
        match self {
            Which::Nftables => "nftables",
            Which::Ipset => "ipset",
        }
    }

    pub fn config(self) -> BackendConfig {
        match self {
            Which::Nftables => BackendConfig::Nftables(NftablesConfig {
                table: "bench_allowsync".into(),
                set_v4: "allow_v4".into(),
                set_v6: "allow_v6".into(),
                enforce: None,
            }),
            Which::Ipset => BackendConfig::Ipset(IpsetConfig {
                set_v4: "bench_as_v4".into(),
                set_v6: "bench_as_v6".into(),
                maxelem: MAXELEM,
                enforce: None,
                check_interval: std::time::Duration::from_secs(10),
            }),
        }
    }

    /// The backend itself, without the [`backend::Cached`] wrapper the daemon uses: a load
    /// measures one `ensure` and one `apply`, nothing around them.
    pub fn backend(self) -> Result<Box<dyn Backend>, BackendError> {
        Ok(match self.config() {
            BackendConfig::Nftables(n) => Box::new(NftablesBackend::new(&n)?),
            BackendConfig::Ipset(i) => Box::new(IpsetBackend::new(&i)?),
            BackendConfig::DryRun | BackendConfig::File(_) => {
                unreachable!("the bench has no dry-run or file contender")
            }
        })
    }
}

/// The child side of a load: `__apply BACKEND FILE`, FILE of `+entry` / `-entry` lines. Prints
/// the microseconds `apply` took. Exit 0, 3 when the backend is unavailable, 1 on failure.
pub fn child_apply(args: &[String]) -> i32 {
    let which = if args[0] == "ipset" { Which::Ipset } else { Which::Nftables };
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let (sign, entry) = line.split_at(1);
        let net = parse_entry(entry).unwrap().net;
        if sign == "+" { add.push(net) } else { remove.push(net) }
    }
    let (add, remove) = (AllowSet::from_nets(add), AllowSet::from_nets(remove));
    let diff = Diff {
        v4: Delta { remove: remove.v4.as_slice().to_vec(), add: add.v4.as_slice().to_vec() },
        v6: Delta { remove: remove.v6.as_slice().to_vec(), add: add.v6.as_slice().to_vec() },
    };
    let mut b = match which.backend() {
        Ok(b) => b,
        Err(e @ BackendError::Unavailable(_)) => {
            eprintln!("{e}");
            return 3;
        }
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Err(e) = b.ensure() {
        eprintln!("ensure: {e}");
        return if matches!(e, BackendError::Unavailable(_)) { 3 } else { 1 };
    }
    let t = Instant::now();
    if let Err(e) = b.apply(&diff) {
        eprintln!("apply: {e}");
        return 1;
    }
    println!("{}", t.elapsed().as_micros());
    0
}

/// One run of the allowsync child: (wall ms, apply ms), or why not.
pub fn allowsync_apply(which: Which, file: &Path) -> Result<(f64, f64), String> {
    let exe = std::env::current_exe().unwrap();
    let t = Instant::now();
    let out = Command::new(exe)
        .args(["__apply", which.arg(), file.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let wall = ms(t.elapsed());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => {
            let us: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(f64::NAN);
            Ok((wall, us / 1000.0))
        }
        Some(3) => Err(format!("unavailable ({err})")),
        _ => Err(format!("failed ({err})")),
    }
}

pub fn entry_lines(sign: char, nets: &[IpNet]) -> String {
    let mut s = String::with_capacity(nets.len() * 24);
    for n in nets {
        let _ = writeln!(s, "{sign}{n}");
    }
    s
}

pub fn nft_elements(nets: &[IpNet]) -> String {
    let mut s = String::with_capacity(nets.len() * 24);
    for (i, n) in nets.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{n}");
    }
    s
}

pub fn nft_set_type(kind: Kind) -> &'static str {
    if kind.v6() { "ipv6_addr" } else { "ipv4_addr" }
}

pub fn nft_reset(kind: Kind) {
    let _ = timed("nft", &["delete", "table", "inet", NFT_TABLE], None);
    let script = format!(
        "add table inet {NFT_TABLE}\nadd set inet {NFT_TABLE} s {{ type {}; flags interval; }}\n",
        nft_set_type(kind)
    );
    let f = tmpfile("nft-create", &script);
    sh("nft", &["-f", f.to_str().unwrap()]);
}

pub fn ipset_name(kind: Kind) -> &'static str {
    if kind.v6() { IPSET_V6 } else { IPSET_V4 }
}

pub fn ipset_reset(kind: Kind) {
    let name = ipset_name(kind);
    let _ = timed("ipset", &["destroy", name], None);
    let family = if kind.v6() { "inet6" } else { "inet" };
    sh("ipset", &["create", name, "hash:net", "family", family, "maxelem", &MAXELEM.to_string()]);
}

pub fn ipset_lines(op: &str, kind: Kind, nets: &[IpNet]) -> String {
    let name = ipset_name(kind);
    let mut s = String::with_capacity(nets.len() * 32);
    for n in nets {
        let _ = writeln!(s, "{op} {name} {n}");
    }
    s
}

pub fn allowsync_reset(which: Which) -> Result<(), String> {
    let mut b = which.backend().map_err(|e| format!("unavailable ({e})"))?;
    b.teardown().map_err(|e| e.to_string())?;
    b.ensure().map_err(|e| e.to_string())
}

pub fn tmpdir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

pub fn tmpfile(name: &str, text: &str) -> PathBuf {
    let p = tmpdir().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn allowsync_bin() -> PathBuf {
    // `make bench` copies the release daemon (built without the mock) there first.
    let copied = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/allowsync");
    if copied.exists() { copied } else { PathBuf::from(env!("CARGO_BIN_EXE_allowsync")) }
}
