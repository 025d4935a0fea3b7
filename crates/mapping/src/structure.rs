//! Segment groups: which ORDER_OBSERVATION an OBX belongs to. A structure declares its
//! groups as data (`starts`, `members`, `parent`); this module walks the message once
//! and assigns every segment to a group instance.
//!
//! The rule, for each segment, from the innermost open group outwards:
//! 1. a segment that starts a child group of this group opens a new instance of it;
//! 2. a segment that starts this group opens a new sibling instance when the current one
//!    already holds a start segment at the same or a later position in `starts` (so an
//!    ORC after an OBR, or a second OBX, begins anew), and joins it otherwise;
//! 3. a member segment joins the group;
//! 4. anything else is tried one level up; the message itself takes every segment.

use passerelle_hl7::Message;

use crate::model::Structure;

/// One instance of a group in a message (instance 0 is the message itself).
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub(crate) group: Option<usize>,
    pub(crate) parent: Option<usize>,
    /// Indexes of the segments in the message, in order.
    pub(crate) segments: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(crate) struct Tree {
    pub(crate) instances: Vec<Instance>,
    /// For each segment of the message, its instance.
    pub(crate) of_segment: Vec<usize>,
}

impl Tree {
    pub(crate) fn build(structure: &Structure, message: &Message<'_>) -> Tree {
        let groups = &structure.groups;
        let mut tree = Tree {
            instances: vec![Instance {
                group: None,
                parent: None,
                segments: Vec::new(),
            }],
            of_segment: Vec::with_capacity(message.segment_count()),
        };
        let mut stack: Vec<usize> = vec![0];
        for segment in message.segments() {
            let id = segment.id();
            let index = segment.index();
            let mut placed = None;
            for depth in (0..stack.len()).rev() {
                let inst = stack[depth];
                let group = tree.instances[inst].group;
                if let Some(child) = groups
                    .iter()
                    .position(|g| g.parent == group && g.starts.iter().any(|s| s == id))
                {
                    stack.truncate(depth + 1);
                    placed = Some(tree.open(child, inst, &mut stack));
                    break;
                }
                let Some(g) = group else {
                    stack.truncate(1);
                    placed = Some(0);
                    break;
                };
                let def = &groups[g];
                if let Some(pos) = def.starts.iter().position(|s| s == id) {
                    let restart = tree.instances[inst].segments.iter().any(|&s| {
                        message
                            .segment(s)
                            .is_some_and(|seg| def.starts[pos..].iter().any(|st| st == seg.id()))
                    });
                    stack.truncate(depth + 1);
                    if restart {
                        stack.pop();
                        let parent = tree.instances[inst].parent.unwrap_or(0);
                        placed = Some(tree.open(g, parent, &mut stack));
                    } else {
                        placed = Some(inst);
                    }
                    break;
                }
                if def.members.iter().any(|m| m == id) {
                    stack.truncate(depth + 1);
                    placed = Some(inst);
                    break;
                }
            }
            let inst = placed.unwrap_or(0);
            tree.instances[inst].segments.push(index);
            tree.of_segment.push(inst);
        }
        tree
    }

    fn open(&mut self, group: usize, parent: usize, stack: &mut Vec<usize>) -> usize {
        self.instances.push(Instance {
            group: Some(group),
            parent: Some(parent),
            segments: Vec::new(),
        });
        let n = self.instances.len() - 1;
        stack.push(n);
        n
    }

    /// Whether `inst` is `ancestor` or lies inside it.
    pub(crate) fn is_within(&self, mut inst: usize, ancestor: usize) -> bool {
        loop {
            if inst == ancestor {
                return true;
            }
            match self.instances[inst].parent {
                Some(p) => inst = p,
                None => return false,
            }
        }
    }
}
