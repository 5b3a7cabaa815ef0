//! The results: the printed table, the PASS/MISS target lines, the JSON, and a contender's series of runs.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::measure::median;

#[derive(Default)]
pub struct Report {
    pub table: String,
    pub targets: Vec<(bool, String)>,
    pub json: BTreeMap<String, Value>,
}

impl Report {
    pub fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.table.push_str(s.as_ref());
        self.table.push('\n');
    }

    pub fn target(&mut self, ok: bool, what: String) {
        let line = format!("{} {what}", if ok { "PASS" } else { "MISS" });
        println!("{line}");
        self.targets.push((ok, line));
    }

    pub fn push(&mut self, section: &str, v: Value) {
        match self.json.entry(section.to_string()).or_insert_with(|| Value::Array(Vec::new())) {
            Value::Array(a) => a.push(v),
            _ => unreachable!(),
        }
    }
}

pub fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) if v >= 10.0 => format!("{v:.0} ms"),
        Some(v) => format!("{v:.1} ms"),
        None => "n/a".into(),
    }
}

pub fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a / b >= 10.0 => format!("{:.0}x", a / b),
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// Medians of a contender's runs, or the first error.
pub struct Series {
    pub wall: Vec<f64>,
    pub inner: Vec<f64>,
    pub error: Option<String>,
}

impl Series {
    pub fn new() -> Self {
        Series { wall: Vec::new(), inner: Vec::new(), error: None }
    }
    pub fn add(&mut self, r: Result<(f64, f64), String>) {
        match r {
            Ok((w, i)) => {
                self.wall.push(w);
                self.inner.push(i);
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
    pub fn wall(&self) -> Option<f64> {
        (self.ok() && !self.wall.is_empty()).then(|| median(&self.wall))
    }
    pub fn inner(&self) -> Option<f64> {
        (self.ok() && !self.inner.is_empty()).then(|| median(&self.inner))
    }
}
