// Package reactor delivers messages of the Aleph network to the programs
// that subscribe to them (on.message), as the reference's reactor does:
// it reads the core node's message feed, keeps the subscriptions of the
// PROGRAM messages it sees there, and hands every matching message to its
// programs, booting them as a request would.
package reactor

// Matches reports whether a message (its JSON as the feed sends it, as a
// map) matches one subscription of a program's on.message, by the
// reference's rule: every key of the subscription must be in the message,
// strings equal, objects included recursively. An empty subscription
// matches nothing. Values of other types (numbers, lists, booleans, null)
// never match: the reference raises on them and drops the message for
// every program, where this node drops only that subscription.
func Matches(subscription, msg map[string]any) bool {
	if len(subscription) == 0 {
		return false
	}
	return includes(subscription, msg)
}

func includes(want, have map[string]any) bool {
	for k, v := range want {
		got, ok := have[k]
		if !ok {
			return false
		}
		switch v := v.(type) {
		case string:
			if s, ok := got.(string); !ok || s != v {
				return false
			}
		case map[string]any:
			m, ok := got.(map[string]any)
			if !ok || !includes(v, m) {
				return false
			}
		default:
			return false
		}
	}
	return true
}
