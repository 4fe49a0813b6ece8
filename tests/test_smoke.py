import requests

from support import ADD_BODY


def test_add_common_answers_like_mindspore(add_url):
    r = requests.post(add_url + "/model/add:add_common", json=ADD_BODY)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
