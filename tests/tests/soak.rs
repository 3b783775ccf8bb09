//! Soak (make soak): written below.
