//! placeholder, replaced by the filter work
