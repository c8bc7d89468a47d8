//! Bounds on a GraphQL document's size and shape, checked before async-graphql
//! parses or validates it, so that no document can crash the process or cost it
//! more than a bounded amount of memory and time.
//!
//! async-graphql's own limits (`limit_depth`, `limit_complexity`, the
//! recursion depth) are checked only after the whole document is parsed and
//! visited, and some of that work is not bounded by the document's size:
//! - its parser recurses once per level of a list or object value (an
//!   argument, a default value, a directive's argument) with no limit, so
//!   `[[[[...]]]]` a few thousand deep overflows the stack and aborts the
//!   process;
//! - the recursion-depth check and the validation visitors inline every
//!   fragment spread without memoizing, so forty fragments that each spread
//!   the next one twice cost 2^40 steps and as much memory ("billion laughs");
//! - a 1 MiB document of tiny selections or arguments becomes hundreds of MiB
//!   of parse tree, and some validation rules are quadratic in arguments.
//!
//! Hence two checks, both linear in the document:
//! - [`check_text`], on the text before any parser sees it: at most
//!   [`GuardLimits::max_tokens`] lexical tokens and at most
//!   [`GuardLimits::max_nesting`] levels of `{`, `[` and `(`;
//! - [`check_document`], on the parsed document: every fragment spread counted
//!   in place (memoized, so fan-out costs nothing to count), at most
//!   [`GuardLimits::max_selections`] selections, no fragment cycle, at most
//!   `max_nesting` levels of selection sets and spreads.
//!
//! [`Guard`] runs both as an async-graphql extension before parsing, for every
//! request whatever its transport; the WebSocket fast path
//! ([`super::compiled::plan`]) calls [`check_text`] before its own parse.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::parser::types::{ExecutableDocument, OperationType, Selection, SelectionSet};
use async_graphql::{Name, Request, ServerError, ServerResult};

/// What a document may hold; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// Most lexical tokens (names, numbers, strings, punctuators) a document
    /// may hold. Variables are not part of the document and do not count.
    pub max_tokens: usize,
    /// Most levels of `{`, `[` and `(` in the text, and of selection sets and
    /// fragment spreads in the parsed document.
    pub max_nesting: usize,
    /// Most selections (fields, fragment spreads, inline fragments) a document
    /// may hold with every fragment spread in place.
    pub max_selections: usize,
    /// The same for a document holding a subscription, which the server keeps
    /// for as long as the subscription lives.
    pub max_subscription_selections: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        Self {
            max_tokens: 10_000,
            max_nesting: 32,
            max_selections: 10_000,
            max_subscription_selections: 100,
        }
    }
}

/// Longest name (or number) a document may hold, in bytes. GraphQL sets no
/// bound, but an alias is kept with its subscription and written into every
/// event it sends.
pub const MAX_NAME_BYTES: usize = 256;

/// Why a document was refused; the message is the client's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Query is too large: more than {0} tokens.")]
    TooManyTokens(usize),
    #[error("Query is nested too deep: more than {0} levels of brackets.")]
    TooDeepText(usize),
    #[error("Query is nested too deep: more than {0} levels of selections and fragment spreads.")]
    TooDeepDocument(usize),
    #[error("Query is too large: more than {0} selections with its fragments spread.")]
    TooManySelections(usize),
    #[error(
        "Subscription is too large: more than {0} selections with its fragments spread \
         (the server keeps a subscription's document for as long as it lives)."
    )]
    TooLargeSubscription(usize),
    #[error("Query has a name or number longer than {0} bytes.")]
    TooLongName(usize),
    #[error("Cannot spread fragment \"{0}\" within itself.")]
    FragmentCycle(String),
}

impl From<Refusal> for ServerError {
    fn from(r: Refusal) -> Self {
        ServerError::new(r.to_string(), None)
    }
}

/// Counts `text`'s tokens and its nesting of brackets, as GraphQL's lexical
/// grammar reads them (whitespace, commas and comments are not tokens; a
/// string or block string is one), stopping at the first limit passed. What is
/// not valid GraphQL is still counted somehow and left to the parser to refuse.
pub fn check_text(text: &str, limits: &GuardLimits) -> Result<(), Refusal> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut tokens = 0usize;
    let mut depth = 0usize;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        tokens += 1;
        if tokens > limits.max_tokens {
            return Err(Refusal::TooManyTokens(limits.max_tokens));
        }
        match b {
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > limits.max_nesting {
                    return Err(Refusal::TooDeepText(limits.max_nesting));
                }
                i += 1;
            }
            b'}' | b']' | b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' if bytes[i..].starts_with(b"\"\"\"") => i = skip_block_string(bytes, i + 3),
            b'"' => i = skip_string(bytes, i + 1),
            b'.' => {
                while i < bytes.len() && bytes[i] == b'.' {
                    i += 1;
                }
            }
            b'!' | b'$' | b'&' | b':' | b'=' | b'@' | b'|' => i += 1,
            // A name, a number, or something the parser will refuse.
            _ => {
                let start = i;
                i += 1;
                while i < bytes.len() && !ends_word(bytes[i]) {
                    i += 1;
                }
                if i - start > MAX_NAME_BYTES {
                    return Err(Refusal::TooLongName(MAX_NAME_BYTES));
                }
            }
        }
    }
    Ok(())
}

fn ends_word(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t'
            | b'\n'
            | b'\r'
            | b','
            | b'#'
            | b'"'
            | b'{'
            | b'}'
            | b'['
            | b']'
            | b'('
            | b')'
            | b'!'
            | b'$'
            | b'&'
            | b':'
            | b'='
            | b'@'
            | b'|'
    )
}

/// The index after the string whose opening quote is before `i`: after its
/// closing quote, or at the line's end when it is unterminated.
fn skip_string(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            b'\n' | b'\r' => return i,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index after the block string whose opening `"""` is before `i`.
fn skip_block_string(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        if bytes[i..].starts_with(b"\\\"\"\"") {
            i += 4;
        } else if bytes[i..].starts_with(b"\"\"\"") {
            return i + 3;
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// Counts `doc`'s selections with every fragment spread in place, each
/// fragment counted once and reused, and refuses cycles and nesting past the
/// limit. Every operation and fragment definition counts, since validation
/// visits them all, whichever operation runs.
pub fn check_document(doc: &ExecutableDocument, limits: &GuardLimits) -> Result<(), Refusal> {
    let mut walk = Walk {
        doc,
        limits,
        fragments: HashMap::new(),
    };
    let mut total = 0usize;
    for (_, op) in doc.operations.iter() {
        let size = walk.set(&op.node.selection_set.node, 0)?.size;
        total = walk.add(total, size)?;
    }
    for name in doc.fragments.keys() {
        let size = walk.fragment(name.as_str(), 0)?.map_or(0, |c| c.size);
        total = walk.add(total, size)?;
    }
    let subscribes = doc
        .operations
        .iter()
        .any(|(_, op)| op.node.ty == OperationType::Subscription);
    if subscribes && total > limits.max_subscription_selections {
        return Err(Refusal::TooLargeSubscription(
            limits.max_subscription_selections,
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Selections, with fragments in place.
    size: usize,
    /// Levels of selection sets and spreads below this one.
    height: usize,
}

enum Memo {
    /// Being counted: a spread of it now is a cycle.
    Open,
    Done(Cost),
}

struct Walk<'a> {
    doc: &'a ExecutableDocument,
    limits: &'a GuardLimits,
    fragments: HashMap<&'a str, Memo>,
}

impl<'a> Walk<'a> {
    fn add(&self, a: usize, b: usize) -> Result<usize, Refusal> {
        let sum = a.saturating_add(b);
        if sum > self.limits.max_selections {
            return Err(Refusal::TooManySelections(self.limits.max_selections));
        }
        Ok(sum)
    }

    /// The cost of a selection set at `depth` (its operation's own is 0);
    /// recursion stops at `max_nesting`, so the stack it takes is bounded.
    fn set(&mut self, set: &'a SelectionSet, depth: usize) -> Result<Cost, Refusal> {
        if depth > self.limits.max_nesting {
            return Err(Refusal::TooDeepDocument(self.limits.max_nesting));
        }
        let mut cost = Cost { size: 0, height: 0 };
        for item in &set.items {
            let below = match &item.node {
                Selection::Field(f) if f.node.selection_set.node.items.is_empty() => None,
                Selection::Field(f) => Some(self.set(&f.node.selection_set.node, depth + 1)?),
                Selection::InlineFragment(f) => {
                    Some(self.set(&f.node.selection_set.node, depth + 1)?)
                }
                Selection::FragmentSpread(s) => {
                    self.fragment(s.node.fragment_name.node.as_str(), depth + 1)?
                }
            };
            let size = below.map_or(0, |b| b.size).saturating_add(1);
            cost.size = self.add(cost.size, size)?;
            if let Some(b) = below {
                cost.height = cost.height.max(b.height + 1);
            }
        }
        if depth + cost.height > self.limits.max_nesting {
            return Err(Refusal::TooDeepDocument(self.limits.max_nesting));
        }
        Ok(cost)
    }

    /// The cost of fragment `name`'s selection set at `depth`; `None` for an
    /// unknown fragment (validation reports it).
    fn fragment(&mut self, name: &'a str, depth: usize) -> Result<Option<Cost>, Refusal> {
        let cost = match self.fragments.get(name) {
            Some(Memo::Done(cost)) => *cost,
            Some(Memo::Open) => return Err(Refusal::FragmentCycle(name.to_owned())),
            None => {
                let Some(def) = self.doc.fragments.get(name) else {
                    return Ok(None);
                };
                self.fragments.insert(name, Memo::Open);
                let cost = self.set(&def.node.selection_set.node, depth)?;
                self.fragments.insert(name, Memo::Done(cost));
                cost
            }
        };
        if depth + cost.height > self.limits.max_nesting {
            return Err(Refusal::TooDeepDocument(self.limits.max_nesting));
        }
        Ok(Some(cost))
    }
}

/// The async-graphql extension that runs [`check_text`] and
/// [`check_document`] before anything else sees a request's document, and
/// hands the parsed document on, so that it is parsed once; that drops the
/// variables no operation declares; and that puts numeric variables back as
/// numbers ([`super::restore_numbers`]).
pub struct Guard(pub GuardLimits);

impl ExtensionFactory for Guard {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(GuardExtension(self.0))
    }
}

struct GuardExtension(GuardLimits);

#[async_graphql::async_trait::async_trait]
impl Extension for GuardExtension {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        check_text(&request.query, &self.0)?;
        let doc = request.parsed_query().map_err(shorten)?;
        check_document(doc, &self.0)?;
        let declared = declared_variables(doc);
        request.variables.retain(|name, _| declared.contains(name));
        // Every executed request passes here, over every transport.
        super::restore_numbers(&mut request.variables);
        next.run(ctx, request).await
    }
}

/// The variables `doc`'s operations declare: the only ones a request keeps.
/// The others are never read, yet a subscription the executor runs keeps its
/// request's variables for as long as it lives, so undeclared ones would let
/// each subscription hold a whole message of them.
pub fn declared_variables(doc: &ExecutableDocument) -> HashSet<Name> {
    doc.operations
        .iter()
        .flat_map(|(_, op)| op.node.variable_definitions.iter())
        .map(|d| d.node.name.node.clone())
        .collect()
}

/// Longest line of a syntax error kept whole.
const MAX_ERROR_LINE: usize = 200;

/// A syntax error quotes the whole line it is on, which for a document on one
/// line is the document: up to a MiB echoed back. Its long lines are cut.
fn shorten(mut e: ServerError) -> ServerError {
    if e.message.lines().all(|l| l.len() <= MAX_ERROR_LINE) {
        return e;
    }
    let lines: Vec<String> = e
        .message
        .lines()
        .map(|l| match l.char_indices().nth(MAX_ERROR_LINE) {
            Some((cut, _)) => format!("{}…", &l[..cut]),
            None => l.to_owned(),
        })
        .collect();
    e.message = lines.join("\n");
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_tokens: usize, max_nesting: usize, max_selections: usize) -> GuardLimits {
        GuardLimits {
            max_tokens,
            max_nesting,
            max_selections,
            ..GuardLimits::default()
        }
    }

    #[test]
    fn tokens_are_counted_as_graphql_reads_them() {
        // query Q ( $ v : [ Int ! ] = [ 1 ] ) { a ( x : "s , { [" ) ... F }
        let q = "query Q($v: [Int!] = [1]) { a(x: \"s , { [\") ...F } # { { { a b c\n";
        assert_eq!(check_text(q, &limits(25, 2, 0)), Ok(()));
        assert_eq!(
            check_text(q, &limits(24, 2, 0)),
            Err(Refusal::TooManyTokens(24))
        );
        assert_eq!(
            check_text(q, &limits(25, 1, 0)),
            Err(Refusal::TooDeepText(1))
        );
        let block = "{ a(x: \"\"\" { [ \\\"\"\" ( \"\"\") }";
        assert_eq!(check_text(block, &limits(8, 2, 0)), Ok(()));
        assert_eq!(
            check_text(block, &limits(8, 1, 0)),
            Err(Refusal::TooDeepText(1))
        );
    }

    #[test]
    fn a_subscription_document_is_held_to_its_own_selection_limit() {
        let fields = |n: usize| -> String { (0..n).map(|i| format!("f{i}: bid ")).collect() };
        let l = GuardLimits {
            max_subscription_selections: 10,
            ..GuardLimits::default()
        };
        // The root field and nine below it; a fragment's selections count too.
        let ok = doc(&format!("subscription {{ quotes {{ {} }} }}", fields(9)));
        assert_eq!(check_document(&ok, &l), Ok(()));
        let over = doc(&format!(
            "subscription {{ quotes {{ ...F }} }} fragment F on Quote {{ {} }}",
            fields(8)
        ));
        assert_eq!(
            check_document(&over, &l),
            Err(Refusal::TooLargeSubscription(10))
        );
        // Queries keep the document limit.
        let query = doc(&format!("{{ venues {{ {} }} }}", fields(100)));
        assert_eq!(check_document(&query, &l), Ok(()));
    }

    #[test]
    fn names_are_bounded() {
        let name = |n: usize| "a".repeat(n);
        let q = |n: usize| format!("subscription {{ quotes {{ {}: bid }} }}", name(n));
        let l = GuardLimits::default();
        assert_eq!(check_text(&q(MAX_NAME_BYTES), &l), Ok(()));
        assert_eq!(
            check_text(&q(MAX_NAME_BYTES + 1), &l),
            Err(Refusal::TooLongName(MAX_NAME_BYTES))
        );
        // A string is not a name.
        let s = format!("{{ a(x: \"{}\") }}", name(10_000));
        assert_eq!(check_text(&s, &l), Ok(()));
    }

    #[test]
    fn only_declared_variables_are_kept() {
        let d = doc("subscription($i: [String!], $r: Float) { quotes(instruments: $i, maxRate: $r) { bid } }");
        let kept = declared_variables(&d);
        let mut names: Vec<&str> = kept.iter().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["i", "r"]);
        assert!(declared_variables(&doc("{ a }")).is_empty());
    }

    #[test]
    fn nesting_counts_every_bracket() {
        let ok = format!("{}1{}", "[".repeat(32), "]".repeat(32));
        assert_eq!(check_text(&ok, &GuardLimits::default()), Ok(()));
        let deep = format!("{}1{}", "[{(".repeat(11), ")}]".repeat(11));
        assert_eq!(
            check_text(&deep, &GuardLimits::default()),
            Err(Refusal::TooDeepText(32))
        );
        // Unbalanced closing brackets never underflow.
        assert_eq!(check_text("}}}]]))", &GuardLimits::default()), Ok(()));
        // Unterminated strings and odd bytes are left to the parser.
        assert_eq!(check_text("{ a(x: \"abc", &GuardLimits::default()), Ok(()));
        assert_eq!(
            check_text("\u{feff}{ é ~ \\ }", &GuardLimits::default()),
            Ok(())
        );
    }

    fn doc(q: &str) -> ExecutableDocument {
        async_graphql::parser::parse_query(q).expect("valid document")
    }

    #[test]
    fn fragment_fan_out_is_counted_in_place_without_inlining() {
        let fan = |n: usize| {
            let frags: String = (0..n)
                .map(|i| format!("fragment F{i} on Query {{ ...F{} ...F{} }} ", i + 1, i + 1))
                .collect();
            doc(&format!(
                "{{ ...F0 }} {frags} fragment F{n} on Query {{ __typename }}"
            ))
        };
        // F0 alone holds 3 * 2^n - 2 selections; the definitions count too.
        let l = limits(usize::MAX, 64, 10_000);
        assert_eq!(check_document(&fan(10), &l), Ok(()));
        assert_eq!(
            check_document(&fan(12), &l),
            Err(Refusal::TooManySelections(10_000))
        );
        assert_eq!(
            check_document(&fan(60), &l),
            Err(Refusal::TooManySelections(10_000))
        );
    }

    #[test]
    fn cycles_and_deep_chains_are_refused() {
        let l = GuardLimits::default();
        assert_eq!(
            check_document(
                &doc("{ ...A } fragment A on Query { ...B } fragment B on Query { a { ...A } }"),
                &l
            ),
            Err(Refusal::FragmentCycle("A".into()))
        );
        let chain = |n: usize| {
            let frags: String = (0..n)
                .map(|i| format!("fragment F{i} on Query {{ ...F{} }} ", i + 1))
                .collect();
            doc(&format!(
                "{{ ...F0 }} {frags} fragment F{n} on Query {{ __typename }}"
            ))
        };
        assert_eq!(check_document(&chain(30), &l), Ok(()));
        assert_eq!(
            check_document(&chain(32), &l),
            Err(Refusal::TooDeepDocument(32))
        );
        // A long chain costs a bounded stack: the walk stops at the limit.
        assert_eq!(
            check_document(&chain(5_000), &l),
            Err(Refusal::TooDeepDocument(32))
        );
        // A fragment first counted shallow is still too deep when spread deep.
        let deep_spread = format!(
            "query A {{ b {{ ...F }} }} query B {{ {} ...F {} }} fragment F on Query {{ c {{ d }} }}",
            "a { ".repeat(31),
            " }".repeat(31)
        );
        assert_eq!(
            check_document(&doc(&deep_spread), &l),
            Err(Refusal::TooDeepDocument(32))
        );
    }
}
