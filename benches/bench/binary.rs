//! The release binary's size, unstripped and stripped.

use serde_json::json;

use crate::contenders::{allowsync_bin, tmpdir};
use crate::measure::sh;
use crate::report::Report;

pub fn binary_size(rep: &mut Report) {
    let bin = allowsync_bin();
    let size = std::fs::metadata(&bin).unwrap().len();
    let stripped_path = tmpdir().join("allowsync.stripped");
    sh("strip", &["-o", stripped_path.to_str().unwrap(), bin.to_str().unwrap()]);
    let stripped = std::fs::metadata(&stripped_path).unwrap().len();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    rep.line("\n## Release binary");
    rep.line(format!(
        "| unstripped | stripped |\n|---:|---:|\n| {:.2} MiB | {:.2} MiB |",
        mib(size),
        mib(stripped)
    ));
    rep.push("binary", json!({ "path": bin, "bytes": size, "stripped_bytes": stripped }));
}
