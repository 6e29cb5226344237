//! The instance a service publishes: its address, and what it says about itself.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::Error;

/// One service instance, as published in the store: usually `host:port`, but any string the
/// service's factory understands (go-kit calls it an "instance"), optionally with
/// [`Metadata`] (weight, zone, labels) when the stored value is JSON (see [`ValueFormat`]).
///
/// An instance *is* its stored value: two instances are equal, ordered and hashed by the value
/// as stored, so a change of weight is a new instance. [`addr`](Self::addr) (also `Deref`,
/// `as_str` and `Display`) is the address a factory connects to; for a plain value it is the
/// value itself. Cheap to clone (`Arc`s).
///
/// ```
/// use sd_core::Instance;
///
/// let a = Instance::new("10.0.0.7:8080");
/// let b = a.clone();
/// assert_eq!(a, b);
/// assert_eq!(a.as_str(), "10.0.0.7:8080");
/// assert_eq!(&*a, "10.0.0.7:8080");
/// assert_eq!(a.weight(), 1);
///
/// let j = Instance::from_value(r#"{"addr":"10.0.0.8:8080","weight":3,"zone":"eu-1"}"#).unwrap();
/// assert_eq!((j.addr(), j.weight(), j.zone()), ("10.0.0.8:8080", 3, Some("eu-1")));
/// ```
#[derive(Clone)]
pub struct Instance {
    /// The value as stored: the instance's identity.
    value: Arc<str>,
    /// What a JSON value says; `None` for a plain value (address = value, default metadata).
    parsed: Option<Arc<Parsed>>,
}

#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    addr: Box<str>,
    meta: Metadata,
}

/// What an instance says about itself besides its address: a weight for weighted balancing
/// (default 1), the zone it runs in, and free-form labels.
///
/// ```
/// use sd_core::Metadata;
///
/// let m = Metadata::new().with_weight(5).unwrap().with_zone("eu-1").with_label("tier", "gold");
/// assert_eq!((m.weight(), m.zone()), (5, Some("eu-1")));
/// assert_eq!(m.labels().get("tier").map(|v| &**v), Some("gold"));
/// assert!(Metadata::new().with_weight(0).is_err(), "a weight is at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Metadata {
    weight: u32,
    zone: Option<Arc<str>>,
    labels: BTreeMap<Arc<str>, Arc<str>>,
}

/// The metadata of a plain value.
static DEFAULT_METADATA: Metadata = Metadata {
    weight: 1,
    zone: None,
    labels: BTreeMap::new(),
};

impl Default for Metadata {
    fn default() -> Self {
        DEFAULT_METADATA.clone()
    }
}

impl Metadata {
    /// Weight 1, no zone, no labels: what a plain value has.
    ///
    /// ```
    /// assert_eq!(sd_core::Metadata::new().weight(), 1);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the weight: this instance's share of picks relative to the others (an instance of
    /// weight 2 gets twice the picks of one of weight 1). At least 1.
    ///
    /// ```
    /// assert_eq!(sd_core::Metadata::new().with_weight(3).unwrap().weight(), 3);
    /// ```
    pub fn with_weight(mut self, weight: u32) -> Result<Self, Error> {
        if weight == 0 {
            return Err(Error::invalid_argument(
                "weight 0: a weight is at least 1 (deregister an instance to take it out)",
            ));
        }
        self.weight = weight;
        Ok(self)
    }

    /// Sets the zone (e.g. `eu-west-1a`).
    ///
    /// ```
    /// assert_eq!(sd_core::Metadata::new().with_zone("z1").zone(), Some("z1"));
    /// ```
    pub fn with_zone(mut self, zone: impl AsRef<str>) -> Self {
        self.zone = Some(Arc::from(zone.as_ref()));
        self
    }

    /// Adds a label.
    ///
    /// ```
    /// let m = sd_core::Metadata::new().with_label("version", "2");
    /// assert_eq!(m.labels().len(), 1);
    /// ```
    pub fn with_label(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.labels
            .insert(Arc::from(key.as_ref()), Arc::from(value.as_ref()));
        self
    }

    /// The weight (1 unless set).
    ///
    /// ```
    /// assert_eq!(sd_core::Metadata::default().weight(), 1);
    /// ```
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The zone, if set.
    ///
    /// ```
    /// assert_eq!(sd_core::Metadata::default().zone(), None);
    /// ```
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// The labels.
    ///
    /// ```
    /// assert!(sd_core::Metadata::default().labels().is_empty());
    /// ```
    pub fn labels(&self) -> &BTreeMap<Arc<str>, Arc<str>> {
        &self.labels
    }

    /// A short description of what differs from the default, for logs and programs:
    /// `weight=2 zone=eu-1 team=a`; empty for the default.
    ///
    /// ```
    /// let m = sd_core::Metadata::new().with_weight(2).unwrap().with_zone("eu-1");
    /// assert_eq!(m.summary(), "weight=2 zone=eu-1");
    /// assert_eq!(sd_core::Metadata::new().summary(), "");
    /// ```
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.weight != 1 {
            parts.push(format!("weight={}", self.weight));
        }
        if let Some(zone) = &self.zone {
            parts.push(format!("zone={zone}"));
        }
        parts.extend(self.labels.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(" ")
    }

    fn is_default(&self) -> bool {
        *self == DEFAULT_METADATA
    }

    /// Our JSON fields, the non-default ones only.
    fn out(&self) -> MetaOut<'_> {
        MetaOut {
            weight: (self.weight != 1).then_some(self.weight),
            zone: self.zone.as_deref(),
            labels: self.labels.iter().map(|(k, v)| (&**k, &**v)).collect(),
        }
    }

    /// Reads `weight`, `zone` and `labels` from free-form metadata: each only where it has our
    /// type (a weight from 1 to `u32::MAX`, a string zone, string labels); others are ignored.
    fn read_lenient(object: &serde_json::Map<String, serde_json::Value>) -> Self {
        let mut meta = Metadata::new();
        if let Some(w) = object
            .get("weight")
            .and_then(serde_json::Value::as_u64)
            .and_then(|w| u32::try_from(w).ok())
            .filter(|w| *w >= 1)
        {
            meta.weight = w;
        }
        if let Some(z) = object.get("zone").and_then(serde_json::Value::as_str) {
            meta.zone = Some(Arc::from(z));
        }
        if let Some(labels) = object.get("labels").and_then(serde_json::Value::as_object) {
            for (k, v) in labels {
                if let Some(v) = v.as_str() {
                    meta.labels.insert(Arc::from(k.as_str()), Arc::from(v));
                }
            }
        }
        meta
    }

    /// Reads `weight`, `zone` and `labels` from a JSON object (each optional).
    fn read(object: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let mut meta = Metadata::new();
        if let Some(w) = object.get("weight") {
            let weight = w
                .as_u64()
                .and_then(|w| u32::try_from(w).ok())
                .filter(|w| *w >= 1)
                .ok_or_else(|| {
                    format!("weight {w} is not a whole number from 1 to {}", u32::MAX)
                })?;
            meta.weight = weight;
        }
        match object.get("zone") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(z)) => meta.zone = Some(Arc::from(z.as_str())),
            Some(other) => return Err(format!("zone {other} is not a string")),
        }
        match object.get("labels") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(labels)) => {
                for (k, v) in labels {
                    let v = v
                        .as_str()
                        .ok_or_else(|| format!("label {k:?} = {v} is not a string"))?;
                    meta.labels.insert(Arc::from(k.as_str()), Arc::from(v));
                }
            }
            Some(other) => return Err(format!("labels {other} is not an object")),
        }
        Ok(meta)
    }
}

/// How an instance is written as a store value. Reading recognises all three, per key.
///
/// - `Plain`: the address itself, exactly as go-kit writes it (`10.0.0.1:80`); no metadata.
/// - `EtcdNaming`: etcd's own naming format, as Go's `naming/endpoints` manager and gRPC's etcd
///   resolver write and read it: `{"Op":0,"Addr":"10.0.0.1:80","Metadata":{...}}`, our metadata
///   as the `Metadata` object (`weight`, `zone`, `labels`).
/// - `Json`: this project's JSON: `{"addr":"10.0.0.1:80","weight":2,"zone":"eu-1","labels":{"k":"v"}}`,
///   fields other than `addr` optional.
///
/// A value that starts with `{` is read as JSON: `Addr` makes it etcd's format, `addr` ours. A
/// value that starts with `{` but is not such JSON is an error for that key alone (instancers
/// skip it, with a warning, and count it), never an instance with an empty or garbled address.
///
/// ```
/// use sd_core::{Instance, Metadata, ValueFormat};
///
/// let meta = Metadata::new().with_weight(2).unwrap().with_zone("eu-1");
/// let value = ValueFormat::EtcdNaming.encode("10.0.0.1:80", &meta).unwrap();
/// assert_eq!(value, r#"{"Op":0,"Addr":"10.0.0.1:80","Metadata":{"weight":2,"zone":"eu-1"}}"#);
/// let back = Instance::from_value(&value).unwrap();
/// assert_eq!((back.addr(), back.metadata()), ("10.0.0.1:80", &meta));
///
/// assert_eq!(ValueFormat::Plain.encode("10.0.0.1:80", &Metadata::new()).unwrap(), "10.0.0.1:80");
/// assert!(ValueFormat::Plain.encode("10.0.0.1:80", &meta).is_err(), "plain carries no metadata");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ValueFormat {
    /// The address alone (go-kit's format; the default).
    #[default]
    Plain,
    /// etcd's naming JSON (`Op`, `Addr`, `Metadata`).
    EtcdNaming,
    /// This project's JSON (`addr`, `weight`, `zone`, `labels`).
    Json,
}

/// Parses the names programs take on their command line: `plain`, `etcd-naming`, `json`.
///
/// ```
/// use sd_core::ValueFormat;
///
/// assert_eq!("etcd-naming".parse::<ValueFormat>().unwrap(), ValueFormat::EtcdNaming);
/// assert!("xml".parse::<ValueFormat>().unwrap_err().to_string().contains("plain, etcd-naming or json"));
/// ```
impl std::str::FromStr for ValueFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "plain" => Ok(ValueFormat::Plain),
            "etcd-naming" => Ok(ValueFormat::EtcdNaming),
            "json" => Ok(ValueFormat::Json),
            other => Err(Error::invalid_argument(format!(
                "value format {other:?}: use plain, etcd-naming or json"
            ))),
        }
    }
}

impl ValueFormat {
    /// The store value for `addr` with `meta`. `Plain` refuses metadata other than the default
    /// (it has nowhere to put it); an empty address is refused by all.
    ///
    /// ```
    /// use sd_core::{Metadata, ValueFormat};
    ///
    /// let v = ValueFormat::Json.encode("a:1", &Metadata::new().with_label("k", "v")).unwrap();
    /// assert_eq!(v, r#"{"addr":"a:1","labels":{"k":"v"}}"#);
    /// assert!(ValueFormat::Json.encode("", &Metadata::new()).is_err());
    /// ```
    pub fn encode(self, addr: &str, meta: &Metadata) -> Result<String, Error> {
        if addr.is_empty() {
            return Err(Error::invalid_argument(
                "instance address is empty: give host:port",
            ));
        }
        let json = match self {
            ValueFormat::Plain => {
                if !meta.is_default() {
                    return Err(Error::invalid_argument(
                        "a plain value carries no metadata: register with ValueFormat::EtcdNaming or ValueFormat::Json",
                    ));
                }
                if addr.trim_start().starts_with('{') {
                    return Err(Error::invalid_argument(format!(
                        "plain address {addr:?} starts with '{{' and would be read as JSON"
                    )));
                }
                return Ok(addr.to_string());
            }
            // Go's field order, as its json.Marshal writes it.
            ValueFormat::EtcdNaming => serde_json::to_string(&EtcdNamingOut {
                op: 0,
                addr,
                metadata: (!meta.is_default()).then(|| meta.out()),
            }),
            ValueFormat::Json => serde_json::to_string(&JsonOut {
                addr,
                meta: meta.out(),
            }),
        };
        json.map_err(|e| Error::invalid_argument(format!("cannot encode {addr:?} as JSON: {e}")))
    }
}

/// etcd's naming format, as written.
#[derive(serde::Serialize)]
struct EtcdNamingOut<'a> {
    #[serde(rename = "Op")]
    op: u8,
    #[serde(rename = "Addr")]
    addr: &'a str,
    #[serde(rename = "Metadata")]
    metadata: Option<MetaOut<'a>>,
}

/// This project's JSON format, as written.
#[derive(serde::Serialize)]
struct JsonOut<'a> {
    addr: &'a str,
    #[serde(flatten)]
    meta: MetaOut<'a>,
}

/// [`Metadata`]'s fields that differ from the default.
#[derive(serde::Serialize)]
struct MetaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<&'a str, &'a str>,
}

impl Instance {
    /// An instance whose stored value is the plain address `s` (go-kit's format), with default
    /// metadata. Never parses `s`: see [`from_value`](Self::from_value) for stored values.
    ///
    /// ```
    /// let i = sd_core::Instance::new(String::from("10.0.0.7:8080"));
    /// assert_eq!(i, "10.0.0.7:8080");
    /// ```
    pub fn new(s: impl AsRef<str>) -> Self {
        Instance {
            value: Arc::from(s.as_ref()),
            parsed: None,
        }
    }

    /// The instance a stored value names, in any [`ValueFormat`]: plain, etcd's naming JSON, or
    /// ours. An error (saying what is wrong) for JSON that is invalid or has no address, for our
    /// format's fields of the wrong type, and for an empty value. In etcd's format `Metadata` is
    /// free-form: our fields are taken where they have our types, others are ignored.
    ///
    /// ```
    /// use sd_core::Instance;
    ///
    /// let plain = Instance::from_value("10.0.0.1:80").unwrap();
    /// assert_eq!((plain.addr(), plain.weight()), ("10.0.0.1:80", 1));
    /// let etcd = Instance::from_value(r#"{"Op":0,"Addr":"10.0.0.2:80","Metadata":{"zone":"z"}}"#).unwrap();
    /// assert_eq!((etcd.addr(), etcd.zone()), ("10.0.0.2:80", Some("z")));
    /// assert!(Instance::from_value(r#"{"Addr": "10.0.0.3:80""#).is_err(), "not valid JSON");
    /// assert!(Instance::from_value(r#"{"weight": 2}"#).is_err(), "no address");
    /// assert!(Instance::from_value("").is_err());
    /// ```
    pub fn from_value(value: &str) -> Result<Self, Error> {
        let bad = |why: String| {
            Error::invalid_argument(format!("stored value {value:?} is not an instance: {why}"))
        };
        if value.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if !value.trim_start().starts_with('{') {
            return Ok(Instance::new(value));
        }
        let json: serde_json::Value =
            serde_json::from_str(value).map_err(|e| bad(format!("invalid JSON ({e})")))?;
        let object = json
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let (addr, meta) = if let Some(addr) = object.get("Addr") {
            // etcd's naming format: `Op` 0 (or absent) is an endpoint to add.
            match object.get("Op") {
                None | Some(serde_json::Value::Null) => {}
                Some(op) if op.as_u64() == Some(0) => {}
                Some(op) => return Err(bad(format!("Op {op} is not 0 (add)"))),
            }
            // etcd's Metadata is free-form (other programs put their own fields there): ours
            // are taken where they have our types, and anything else is left alone.
            let meta = match object.get("Metadata") {
                Some(serde_json::Value::Object(m)) => Metadata::read_lenient(m),
                _ => Metadata::new(),
            };
            (addr, meta)
        } else if let Some(addr) = object.get("addr") {
            (addr, Metadata::read(object).map_err(&bad)?)
        } else {
            return Err(bad(
                "JSON with neither \"Addr\" (etcd's naming format) nor \"addr\"".into(),
            ));
        };
        let addr = match addr.as_str() {
            Some(a) if !a.is_empty() => a,
            _ => return Err(bad(format!("address {addr} is not a non-empty string"))),
        };
        Ok(Instance {
            value: Arc::from(value),
            parsed: Some(Arc::new(Parsed {
                addr: Box::from(addr),
                meta,
            })),
        })
    }

    /// An instance of `addr` with `meta`, stored as `format` would write it.
    ///
    /// ```
    /// use sd_core::{Instance, Metadata, ValueFormat};
    ///
    /// let i = Instance::with_metadata("a:1", Metadata::new().with_weight(4).unwrap(), ValueFormat::Json).unwrap();
    /// assert_eq!((i.addr(), i.weight(), i.value()), ("a:1", 4, r#"{"addr":"a:1","weight":4}"#));
    /// ```
    pub fn with_metadata(addr: &str, meta: Metadata, format: ValueFormat) -> Result<Self, Error> {
        let value = format.encode(addr, &meta)?;
        if format == ValueFormat::Plain {
            return Ok(Instance::new(value));
        }
        Ok(Instance {
            value: Arc::from(value),
            parsed: Some(Arc::new(Parsed {
                addr: Box::from(addr),
                meta,
            })),
        })
    }

    /// The address: what a factory connects to (the whole value, for a plain value).
    ///
    /// ```
    /// assert_eq!(sd_core::Instance::new("a:1").addr(), "a:1");
    /// ```
    pub fn addr(&self) -> &str {
        match &self.parsed {
            Some(p) => &p.addr,
            None => &self.value,
        }
    }

    /// The address, as [`addr`](Self::addr).
    ///
    /// ```
    /// assert_eq!(sd_core::Instance::new("a:1").as_str(), "a:1");
    /// ```
    pub fn as_str(&self) -> &str {
        self.addr()
    }

    /// The value as stored: the instance's identity.
    ///
    /// ```
    /// let i = sd_core::Instance::from_value(r#"{"addr":"a:1"}"#).unwrap();
    /// assert_eq!((i.value(), i.addr()), (r#"{"addr":"a:1"}"#, "a:1"));
    /// ```
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What the instance says about itself (the default for a plain value).
    ///
    /// ```
    /// assert_eq!(*sd_core::Instance::new("a:1").metadata(), sd_core::Metadata::default());
    /// ```
    pub fn metadata(&self) -> &Metadata {
        match &self.parsed {
            Some(p) => &p.meta,
            None => &DEFAULT_METADATA,
        }
    }

    /// The weight (1 for a plain value).
    ///
    /// ```
    /// assert_eq!(sd_core::Instance::new("a:1").weight(), 1);
    /// ```
    pub fn weight(&self) -> u32 {
        self.metadata().weight
    }

    /// The zone, if the instance says.
    ///
    /// ```
    /// assert_eq!(sd_core::Instance::new("a:1").zone(), None);
    /// ```
    pub fn zone(&self) -> Option<&str> {
        self.metadata().zone()
    }
}

/// Equal stored values; two clones of one instance compare without reading the strings (the
/// sets publishers and endpointers compare share most of their instances).
impl PartialEq for Instance {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.value, &other.value) || self.value == other.value
    }
}

impl Eq for Instance {}

/// Ordered by stored value, as `PartialEq` compares.
impl PartialOrd for Instance {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Instance {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

/// Hashes the stored value, as `PartialEq` compares it.
impl std::hash::Hash for Instance {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.value.hash(state)
    }
}

/// The address.
impl Deref for Instance {
    type Target = str;
    fn deref(&self) -> &str {
        self.addr()
    }
}

/// The address.
impl AsRef<str> for Instance {
    fn as_ref(&self) -> &str {
        self.addr()
    }
}

/// The stored value (the identity: consistent with `Eq`, `Ord` and `Hash`), so sets and maps of
/// instances can be looked up by the value a store holds.
impl Borrow<str> for Instance {
    fn borrow(&self) -> &str {
        &self.value
    }
}

/// The stored value.
impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.value, f)
    }
}

/// The address.
impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.addr())
    }
}

/// A plain instance (see [`Instance::new`]).
impl From<&str> for Instance {
    fn from(s: &str) -> Self {
        Instance::new(s)
    }
}

/// A plain instance (see [`Instance::new`]).
impl From<String> for Instance {
    fn from(s: String) -> Self {
        Instance {
            value: Arc::from(s),
            parsed: None,
        }
    }
}

/// Compares the stored value.
impl PartialEq<str> for Instance {
    fn eq(&self, other: &str) -> bool {
        &*self.value == other
    }
}

/// Compares the stored value.
impl PartialEq<&str> for Instance {
    fn eq(&self, other: &&str) -> bool {
        &*self.value == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_round_trips() {
        let meta = Metadata::new()
            .with_weight(7)
            .unwrap()
            .with_zone("eu-1")
            .with_label("tier", "gold");
        for format in [ValueFormat::EtcdNaming, ValueFormat::Json] {
            let value = format.encode("10.0.0.1:80", &meta).unwrap();
            let i = Instance::from_value(&value).unwrap();
            assert_eq!(
                (i.addr(), i.metadata(), i.value()),
                ("10.0.0.1:80", &meta, &*value)
            );
            assert_eq!(
                i,
                Instance::with_metadata("10.0.0.1:80", meta.clone(), format).unwrap()
            );
        }
        let plain = Instance::from_value("10.0.0.1:80").unwrap();
        assert_eq!(plain, Instance::new("10.0.0.1:80"));
        assert_eq!(plain.metadata(), &Metadata::default());
    }

    /// etcd's Metadata is free-form: fields of other types are not ours and are ignored,
    /// where our own JSON format refuses them.
    #[test]
    fn foreign_metadata_in_etcds_format_is_tolerated() {
        let i = Instance::from_value(
            r#"{"Op":0,"Addr":"a:1","Metadata":{"weight":"heavy","zone":"z","labels":{"k":1,"ok":"v"},"version":3}}"#,
        )
        .unwrap();
        assert_eq!((i.weight(), i.zone()), (1, Some("z")));
        assert_eq!(i.metadata().labels().len(), 1);
        assert!(Instance::from_value(r#"{"addr":"a:1","weight":"heavy"}"#).is_err());
    }

    #[test]
    fn go_written_values_are_read() {
        // What Go's endpoints manager writes: no metadata, or metadata of its own shape.
        let go =
            Instance::from_value(r#"{"Op":0,"Addr":"127.0.0.1:9000","Metadata":null}"#).unwrap();
        assert_eq!((go.addr(), go.weight()), ("127.0.0.1:9000", 1));
        let other = Instance::from_value(r#"{"Addr":"127.0.0.1:9001","Metadata":"v2"}"#).unwrap();
        assert_eq!(other.addr(), "127.0.0.1:9001");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (value, why) in [
            (r#"{"Addr":"a:1""#, "invalid JSON"),
            (r#"{"addr":""}"#, "not a non-empty string"),
            (r#"{"addr":"a:1","weight":0}"#, "weight 0"),
            (r#"{"addr":"a:1","weight":"2"}"#, "weight \"2\""),
            (r#"{"addr":"a:1","zone":3}"#, "zone 3"),
            (r#"{"addr":"a:1","labels":{"k":1}}"#, "label \"k\""),
            (r#"{"Op":1,"Addr":"a:1"}"#, "Op 1"),
            (r#"{"host":"a:1"}"#, "neither"),
        ] {
            let err = Instance::from_value(value).unwrap_err().to_string();
            assert!(err.contains(why), "{value}: {err}");
        }
        // `[1,2]` does not start with '{': it is a plain (if odd) address, not JSON.
        assert!(Instance::from_value("[1,2]").is_ok());
    }
}
